"""Run logging: an append-only JSONL metrics file and a compact console line per step, plus
TensorBoard and Weights & Biases when asked for."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from trainer.progress import format_duration

_CONSOLE_KEYS = [
    ("eval/success", "eval success", "{:.2f}"),
    ("eval/invalid_rate", "eval invalid", "{:.2f}"),
    ("rollout/success", "success", "{:.2f}"),
    ("rollout/invalid_rate", "invalid", "{:.2f}"),
    ("reward/mean", "reward", "{:.2f}"),
    ("loss/policy", "loss", "{:+.4f}"),
    ("entropy/rollout_mean", "entropy", "{:.2f}"),
    ("learner/tokens_per_s", "learn tok/s", "{:.0f}"),
    ("time/generate", "gen s", "{:.1f}"),
    ("time/update", "update s", "{:.1f}"),
    ("time/step", "step s", "{:.1f}"),
]


class RunLogger:
    """JSONL (always), the console line, TensorBoard event files when asked for
    (`train.tensorboard=true`: `<run_dir>/tensorboard`, one scalar per metric key), and a W&B
    run when `wandb` (a `WandbConfig`) names a project."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        tensorboard: bool = False,
        wandb: Any = None,
        config: dict | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._pending: list[str] = []  # lines a failed write (full disk) left to write next time
        if enabled:
            _drop_partial_line(self.path)
        self.board = _summary_writer(self.run_dir / "tensorboard") if enabled and tensorboard else None
        self.wandb = _wandb_run(self.run_dir, wandb, config) if enabled and wandb is not None and wandb.project else None
        self.clock = time.monotonic
        self._first: tuple[int, float] | None = None  # (step, clock) of the first step logged with a total

    def log(self, step: int, metrics: dict[str, float], total_steps: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._pending.append(json.dumps(record) + "\n")
        self._write_pending()
        if self.board is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, step)
            self.board.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _CONSOLE_KEYS if k in metrics]
        where = f"step {step}/{total_steps}" if total_steps else f"step {step}"
        eta = self.eta(step, total_steps, metrics) if total_steps else None
        if eta is not None:
            shown.append(f"ETA {format_duration(eta)}")
        self.console.print(f"[bold]{where}[/bold]  " + "  ".join(shown))

    def eta(self, step: int, total_steps: int, metrics: dict[str, float]) -> float | None:
        """Seconds left in the run: steps left x the mean wall time per step since the first
        step this logger saw (evaluations and checkpoints in between included); at that first
        step its own `time/step`. None when nothing says yet, or when the run is at its end."""
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        if step > first_step:
            per_step = (now - first_time) / (step - first_step)
        elif isinstance(metrics.get("time/step"), (int, float)):
            per_step = float(metrics["time/step"])
        else:
            return None
        left = total_steps - step
        return per_step * left if left > 0 else None

    def _write_pending(self) -> None:
        """Append the pending lines whole or not at all: a write cut by a full disk is truncated
        away (a partial line would swallow the next record) and retried with the next record."""
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as f:  # append-only: a killed run never truncates history
                f.write("".join(self._pending))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            self.console.print(
                f"[red]metrics.jsonl: could not write {len(self._pending)} record(s) ({exc}); kept in "
                f"memory and written with the next one. {disk_hint(self.path, exc)}[/red]",
                soft_wrap=True,
            )
            return
        self._pending.clear()

    def discard_after(self, step: int) -> int:
        """Move the records of steps after `step` (work a resumed run plays again) into
        metrics.discarded.jsonl, so the history holds each step once; returns how many moved.
        `step` 0: a fresh start in a folder with an earlier history moves all of it."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, moved = [], []
        for line in self.path.read_text().splitlines(keepends=True):
            (moved if json.loads(line)["step"] > step or step == 0 else kept).append(line)
        if moved:
            with open(self.run_dir / "metrics.discarded.jsonl", "a") as f:
                f.writelines(moved)
                f.flush()
                os.fsync(f.fileno())
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        return len(moved)

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, soft_wrap=True)  # one line: paths stay whole

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a write cut by a kill or a full disk)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def disk_hint(path: Path, exc: BaseException) -> str:
    """What to do about a failed write under `path`, with the free space there now."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free / 2**20
    except OSError:
        return "Check the disk of train.output_dir."
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 64:
        cause = "The disk is full"
    else:  # torch's and safetensors' writers do not pass the errno on
        cause = "A full disk (or quota) is the usual cause"
    return (
        f"{cause}: {free:.0f} MB free under {path} now (partial files removed); free space or set "
        "train.output_dir to a disk with room."
    )


def _wandb_run(run_dir: Path, cfg: Any, config: dict | None):
    """A W&B run that a resumed entrorl run continues (its id is kept in the run folder)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            f"train.wandb.project={cfg.project!r} needs the wandb package: pip install wandb "
            "(or set train.wandb.project='' to turn W&B off)"
        ) from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity or None,
        name=cfg.name or run_dir.name,
        id=run_id,
        resume="allow",
        mode=cfg.mode,
        tags=list(cfg.tags),
        dir=str(run_dir),
        config=config,
    )


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder))
