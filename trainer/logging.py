"""Run logging: an append-only JSONL metrics file and a compact console line per step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

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
    """JSONL (always), the console line, and TensorBoard event files when asked for
    (`train.tensorboard=true`: `<run_dir>/tensorboard`, one scalar per metric key)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False)
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.board = _summary_writer(self.run_dir / "tensorboard") if enabled and tensorboard else None

    def log(self, step: int, metrics: dict[str, float], total_steps: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:  # append-only: a killed run never truncates history
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.board is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, step)
            self.board.flush()
        shown = [f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _CONSOLE_KEYS if k in metrics]
        where = f"step {step}/{total_steps}" if total_steps else f"step {step}"
        self.console.print(f"[bold]{where}[/bold]  " + "  ".join(shown))

    def info(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(folder))
