"""What the policy learner (`deepspeed.py`) and the critic (`critic.py`) share: the process
group, the DeepSpeed config, and one optimizer step of gradient accumulation over micro-batches
(`accumulate_gradients`), with the zero-loss pass of a rank that has fewer micro-batches.

Collectives go through `trainer/device.py`, as everywhere in the trainer.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from agents.types import Trajectory
from trainer.batch import MicroBatch, make_micro_batch
from trainer.config import Config
from trainer.device import backend_for, sum_over_ranks


def init_distributed(device: torch.device | None = None) -> None:
    """Join the process group the `deepspeed` launcher describes, or make a 1-rank one: NCCL
    when this rank computes on a GPU (`device`, made current first), gloo otherwise."""
    import deepspeed

    if dist.is_initialized():
        return
    # DeepSpeed JIT-builds a CPU comm op with the first `ninja` on PATH; prefer this venv's so a
    # system ninja does not rebuild (and invalidate) the shared extension cache on every switch.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] == "1":
        # Only this process joins a 1-rank group, so any free port serves; an inherited
        # MASTER_PORT (a parent process's own group) would be taken.
        os.environ["MASTER_PORT"] = str(_free_port())
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed's engine use the current device
    backend = backend_for(device)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if backend == "gloo":
        _unlink_shm_buffer()


def shm_buffer_path(rank: int, addr: str, port: str) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for `rank` (ops/csrc/cpu/comm/shm.cpp)."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce creates one 66 MB /dev/shm file per rank and never unlinks it,
    so every multi-rank CPU run, ended or killed, leaves them in RAM. init returns only once this
    rank has mapped every peer's file; after a barrier all have, and each rank removes its own
    name (the mappings live on): a run then leaves nothing behind, even when killed."""
    dist.barrier()
    shm_buffer_path(dist.get_rank(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]).unlink(
        missing_ok=True
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ds_config(cfg: Config) -> dict:
    learner = cfg.learner
    config = {
        "train_micro_batch_size_per_gpu": 1,  # our micro-batches are packed rows, sized by tokens
        "gradient_accumulation_steps": 1,  # we mark accumulation boundaries ourselves
        "gradient_clipping": learner.max_grad_norm,
        "zero_optimization": {"stage": learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.train.device.startswith("cuda") and cfg.model.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}  # bf16 compute, fp32 master weights in the optimizer
    return config


# -- one optimizer step over micro-batches --------------------------------------------------------


@dataclass
class GradientStep:
    """What `accumulate_gradients` did: the global gradient norm before clipping (not finite:
    the weights were not touched), and whether a ZeRO-0 non-finite gradient was dropped."""

    norm: float
    dropped: bool


def accumulate_gradients(
    engine: Any,
    n_local: int,
    n_micro: int,
    loss_of: Callable[[int], torch.Tensor],
    dummy_loss: Callable[[], torch.Tensor],
    *,
    world_size: int,
    zero_stage: int,
    before_backward: Callable[[], None] = lambda: None,
) -> GradientStep:
    """One optimizer step over `n_micro` micro-batches: `loss_of(k)` for this rank's `n_local`
    ones, then `dummy_loss()` (zero, through the same forward) so that every rank runs the same
    number of backward passes (ZeRO hangs otherwise). Gradients accumulate until the last one,
    the accumulation boundary, where the engine steps. Each loss is multiplied by the world size:
    DeepSpeed averages gradients over ranks, and the global counts already normalise.
    `before_backward` runs just before each backward (an OOM inside one leaves partial gradients).

    ZeRO 1-3 skip the step themselves on a non-finite gradient norm; ZeRO-0 (fp32) records no
    norm and would apply it, so the norm is measured here and such a gradient is dropped."""
    zero_norm = 0.0
    for k in range(n_micro):
        engine.set_gradient_accumulation_boundary(k == n_micro - 1)
        loss = loss_of(k) if k < n_local else dummy_loss()
        before_backward()
        engine.backward(loss * world_size)
        if k == n_micro - 1 and zero_stage == 0:
            zero_norm = grad_norm(engine.module)
            if not math.isfinite(zero_norm):
                engine.module.zero_grad(set_to_none=True)
                return GradientStep(float(engine.get_global_grad_norm() or zero_norm), True)
        engine.step()
    return GradientStep(float(engine.get_global_grad_norm() or zero_norm), False)


def grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the (already all-reduced) gradients, before clipping."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def dummy_micro_batch() -> MicroBatch:
    """One sample of one token: the zero-loss pass of a rank with fewer micro-batches."""
    sample = Trajectory([0], [0], [1], [0.0], [0.0], 0.0, 0, 0)
    return make_micro_batch([sample], [torch.zeros(1)], [0])


def split(n: int, parts: int) -> list[list[int]]:
    """Indices 0..n-1 in `parts` consecutive mini-batches (learner.mini_batches)."""
    size = -(-n // parts)
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)] or [[]]


def global_counts(samples: list[Trajectory]) -> tuple[int, int]:
    """(sampled tokens, sequences with any) over every rank's share of a mini-batch."""
    counts = torch.tensor(
        [sum(s.num_sampled_tokens for s in samples), sum(s.num_sampled_tokens > 0 for s in samples)],
        dtype=torch.float64,
    )
    counts = sum_over_ranks(counts)
    return int(counts[0]), int(counts[1])


def sample_rows(per_sample: list[torch.Tensor], micro: MicroBatch) -> torch.Tensor:
    """The micro-batch's samples' rows of a per-sample list, in its [B, T] layout."""
    out = torch.zeros_like(micro.loss_mask)
    for r, i in enumerate(micro.sample_index):
        row = per_sample[i][: out.shape[1]]
        out[r, : len(row)] = row.to(out.device)
    return out
