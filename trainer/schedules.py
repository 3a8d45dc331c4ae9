"""Learning-rate schedules as multipliers of `learner.lr`, per optimizer step (pure, tested).

`warmup_steps` ramps linearly from 1/warmup to 1 (the first step is not a zero-lr step), then
the named decay runs over the remaining steps down to `min_lr_ratio`.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_multiplier(step: int, total: int, warmup: int = 0, kind: str = "constant", min_ratio: float = 0.0) -> float:
    """Multiplier for optimizer step `step` (0-based) of `total`."""
    if kind not in SCHEDULES:
        raise ValueError(f"learner.lr_scheduler={kind!r}: use one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay
