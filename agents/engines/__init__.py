"""Inference engines behind one protocol (base.py): `hf` and `vllm`, chosen by `make_engine`."""

ENGINES = ("hf", "vllm")


def make_engine(kind: str, model_path: str, device: str = "cpu", prefix_cache_mib: int = 1024, **vllm_kwargs):
    """The rollout's inference engine (`rollout.engine`); vLLM is imported only when asked for."""
    if kind == "hf":
        from agents.engines.hf import HFEngine

        return HFEngine.from_pretrained(model_path, device=device, prefix_cache_bytes=prefix_cache_mib << 20)
    if kind == "vllm":
        from agents.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, **vllm_kwargs)
    raise ValueError(f"rollout.engine={kind!r}: use one of {', '.join(ENGINES)}")
