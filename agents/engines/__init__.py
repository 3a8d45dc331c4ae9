"""Inference engines behind one protocol (base.py): `hf` and `vllm`, chosen by `make_engine`."""

ENGINES = ("hf", "vllm")


def make_engine(kind: str, model_path: str, device: str = "cpu", **vllm_kwargs):
    """The rollout's inference engine (`rollout.engine`); vLLM is imported only when asked for."""
    if kind == "hf":
        from agents.engines.hf import HFEngine

        return HFEngine.from_pretrained(model_path, device=device)
    if kind == "vllm":
        from agents.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, **vllm_kwargs)
    raise ValueError(f"rollout.engine={kind!r}: use one of {', '.join(ENGINES)}")
