"""Device discipline in one place: where the learner computes and where collectives run.

Two decisions, made here and nowhere else:

- the compute device of this rank (`resolve_device`): `cpu`, or `cuda` = `cuda:LOCAL_RANK` (one
  GPU per rank, as the `deepspeed` launcher numbers them). Every tensor that meets the model is
  moved there once per micro-batch (`trainer.batch.MicroBatch.to`).
- the device of collective tensors (`comm_device`), from the process group's backend: NCCL
  reduces only CUDA tensors, gloo only CPU ones. Every all-reduce / all-gather of the trainer goes
  through the helpers below, which move their input there and hand the result back on the CPU
  (the callers turn them into Python numbers or CPU-side bookkeeping).

Gloo accepts CPU tensors whatever the model's device, so CPU runs never catch a tensor on the
wrong device; `tests/trainer/test_device.py` does, with the model on PyTorch's `meta` device.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


class DeviceError(ValueError):
    """A device setting this machine cannot honour; the message names the key and the fix."""


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def global_rank() -> int:
    """This process's rank in the process group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def resolve_device(spec: str) -> torch.device:
    """`train.device` -> this rank's torch device: `cpu`, `cuda` (= cuda:LOCAL_RANK) or `cuda:N`."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise DeviceError(f"train.device={spec!r}: use cpu, cuda (one GPU per rank) or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"train.device={spec} but this machine has no CUDA device (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}): set train.device=cpu, or install a CUDA build of torch"
        )
    index = local_rank() if spec == "cuda" else int(spec.split(":", 1)[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"train.device={spec} asks for GPU {index} (LOCAL_RANK={local_rank()}) but only {count} "
            f"are visible: launch at most {count} ranks per node (NUM_GPUS={count}) or fix CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def backend_for(device: torch.device) -> str:
    """The process-group backend for a compute device: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def accelerator_device() -> torch.device:
    """This rank's GPU (made current by the learner before the process group starts)."""
    return torch.device("cuda", torch.cuda.current_device())


def comm_device() -> torch.device:
    """Where a collective's tensors must live for this process group's backend."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return accelerator_device()
    return torch.device("cpu")


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks; the result on the CPU (the input when there is one rank)."""
    if not distributed():
        return values
    out = values.to(comm_device())
    dist.all_reduce(out)
    return out.cpu()


def max_over_ranks(value: int) -> int:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.long, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (a collective: every rank must call it)."""
    if not distributed():
        return flag
    value = torch.tensor([float(flag)], device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_1d(values: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's 1-D tensor (lengths may differ), in rank order, on the CPU."""
    if not distributed():
        return values
    device = comm_device()
    sizes: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(sizes, values.numel())  # plain ints: no device round trip per rank
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=device)
    padded[: values.numel()] = values.to(device)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]).cpu()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order ([obj] with one rank)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
