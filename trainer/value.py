"""Value-function math for PPO with a critic (arXiv 1707.06347, GAE 1506.02438): the clipped value loss and
explained variance. Pure tensor functions over `[B, T]` rows, like `trainer/losses/`; the
critic module (`trainer/learner/critic.py`) runs the model and aggregates.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, loss_mask: Tensor, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO value loss `0.5 * max((V - R)^2, (V_clip - R)^2)`, zero where loss_mask == 0.

    V_clip = V_old + clamp(V - V_old, -clip, clip): the value may not move further than `clip`
    from the values the advantages were computed with, unless that moves it away from R (the
    max keeps the larger, pessimistic loss). clip = 0 disables clipping (plain 0.5 (V - R)^2).
    """
    valid = loss_mask > 0
    unclipped = (values - returns) ** 2
    if clip > 0:
        moved = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (moved - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        clip_frac = _masked_mean((clipped > unclipped).float(), valid)
    else:
        loss = 0.5 * unclipped
        clip_frac = values.new_zeros(())
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    metrics = {
        "critic/clip_frac": clip_frac.detach(),
        "critic/values_mean": _masked_mean(values.detach(), valid),
        "critic/returns_mean": _masked_mean(returns, valid),
    }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, loss_mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 = perfect, 0 = as good as a constant,
    negative = worse than one. nan when the returns have no variance."""
    valid = loss_mask > 0
    r, v = returns[valid].double(), values[valid].double()
    if r.numel() < 2:
        return float("nan")
    var = r.var()
    return float(1.0 - (r - v).var() / var) if var > 0 else float("nan")


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1)
