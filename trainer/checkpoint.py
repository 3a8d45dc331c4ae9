"""Atomic, resumable checkpoints: a run killed at any point restarts from its last complete one.

Layout under `<run_dir>/checkpoints/`:

    step_00000012/            one complete checkpoint (the name carries the RL step)
        deepspeed/            engine.save_checkpoint: model, optimizer, LR scheduler (per-rank shards)
        critic/               the same for the critic's engine (PPO with GAE only)
        trainer.pt            step, task-sampler position, controller state (EPO, AEnt, KL, BAPO, ...)
        rng_rank{r}.pt        each rank's python / numpy / torch (and CUDA) RNG states
        COMPLETE              written last
    .step_00000016.tmp/       a save in progress (never loaded; removed by the next save)

Why this is safe: every rank writes into the hidden temp folder; after a barrier rank 0 fsyncs
every file, writes `COMPLETE`, and renames the folder to its final name (one atomic rename on a
POSIX file system). `latest()` only considers final names that hold `COMPLETE`, so a kill or a
full disk mid-save leaves the previous checkpoint as the one that resumes. Keep-last-N pruning
runs only after the new checkpoint is complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.device import global_rank

_NAME = re.compile(r"^step_(\d{8})$")
_MARKER = "COMPLETE"


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk (a rename is only as durable as its data)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(folder, name))
        _fsync_path(folder)


def is_write_failure(exc: BaseException) -> bool:
    """A failed write (full disk, quota, file size limit, ...). torch.save reports it as a
    RuntimeError from its zip writer ("PytorchStreamWriter failed writing file", "unexpected
    pos"), safetensors as a SafetensorError, not as the OSError underneath."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    markers = ("PytorchStreamWriter", "inline_container", "file write failed", "unexpected pos", "No space left")
    return type(exc).__name__ == "SafetensorError" or (isinstance(exc, RuntimeError) and any(m in text for m in markers))


class Checkpointer:
    """Saves and finds checkpoints of one run. Every rank calls `save` and `load` (collectives)."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"train.keep_checkpoints={keep_last}: keep at least 1")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / _MARKER).is_file()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, learner: Any, trainer_state: dict[str, Any], critic: Any = None) -> Path:
        """Write checkpoint `step`; return its final path. On an error (disk full, ...) the
        partial folder is removed on this rank and the error propagates: the previous
        checkpoint stays the latest."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        rank = global_rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step_*.tmp"):  # a save that died before its rename
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        try:
            learner.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")
            if critic is not None:
                critic.engine.save_checkpoint(str(tmp / "critic"), tag="state")
            torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
            if rank == 0:
                torch.save({"step": step, **trainer_state}, tmp / "trainer.pt")
            _barrier()
            if rank == 0:
                fsync_tree(tmp)
                marker = tmp / _MARKER
                marker.write_text(f"{step}\n")
                fsync_tree(tmp)
                if final.exists():  # the same step saved again (e.g. the last step twice)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_path(self.root)  # make the rename itself durable
                self._prune()
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _barrier()
        return final

    def load(self, path: str | Path, learner: Any, critic: Any = None) -> dict[str, Any]:
        """Restore model, optimizer, scheduler (and the critic's), and this rank's RNG; return
        the trainer state."""
        path = Path(path)
        if not (path / _MARKER).is_file():
            raise FileNotFoundError(
                f"{path} is not a complete entrorl checkpoint (no {_MARKER} marker); "
                f"complete ones: {[str(p) for p in self.complete()] or 'none'}"
            )
        load_path, _ = learner.engine.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / 'deepspeed'}")
        if critic is not None:
            if not (path / "critic").is_dir():
                raise FileNotFoundError(
                    f"{path} has no critic/ state (saved by a run without a critic): resume with the "
                    "advantage estimator it was trained with, or start fresh (train.resume=never)"
                )
            critic_path, _ = critic.engine.load_checkpoint(
                str(path / "critic"), tag="state", load_optimizer_states=True
            )
            if critic_path is None:
                raise RuntimeError(f"DeepSpeed could not load the critic in {path / 'critic'}")
        rank_rng = path / f"rng_rank{global_rank()}.pt"
        # A run resumed on a different number of ranks keeps its fresh RNG for the new ranks.
        if rank_rng.is_file():
            set_rng_state(torch.load(rank_rng, weights_only=False))
        return torch.load(path / "trainer.pt", weights_only=False)

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
