"""Importance-sampling correction between the rollout engine's policy and the learner's.

The samples were drawn by the behaviour policy mu (the engine's weights, `rollout_logprobs`),
the update is taken against pi_old (the learner's weights at the start of the update,
`old_logprobs`, recomputed by the learner whenever a rollout feeds more than one optimizer
step). They differ when the engine's weights lag (`train.max_staleness > 0`) and, slightly,
always (different kernels, bf16 vs fp32: the "training-inference mismatch", which is why pi_old
is never taken from the engine). The
correction multiplies each token's policy loss by a truncated importance weight
w = min(pi_old / mu, cap) (truncated IS as in verl/OpenRLHF's "TIS"):

- "token":    w_t = min(exp(old_t - rollout_t), cap)
- "sequence": one weight per row, w = min(exp(sum_t (old_t - rollout_t)), cap), on every token
- "none":     w = 1 (the mismatch is still measured: `mismatch_metrics`)

Weights are constants (no gradient). Pure functions over [B, T] rows; zero where loss_mask == 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROLLOUT_IS_MODES = ("none", "token", "sequence")


def rollout_is_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, loss_mask: Tensor, mode: str, cap: float
) -> Tensor:
    """[B, T] truncated importance weights pi_old / mu (see the module docstring)."""
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"rollout IS mode {mode!r}: use one of {', '.join(ROLLOUT_IS_MODES)}")
    valid = loss_mask > 0
    log_w = torch.where(valid, old_logprobs.detach() - rollout_logprobs, torch.zeros_like(old_logprobs))
    if mode == "none":
        weights = torch.ones_like(log_w)
    elif mode == "token":
        weights = log_w.clamp(max=torch.log(torch.tensor(cap))).exp()
    else:
        per_row = log_w.sum(dim=1, keepdim=True).clamp(max=torch.log(torch.tensor(cap)).item())
        weights = per_row.exp().expand_as(log_w)
    return torch.where(valid, weights, torch.zeros_like(weights))


def mismatch_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, loss_mask: Tensor) -> dict[str, Tensor]:
    """How far the behaviour policy mu is from pi_old on the sampled tokens, with
    log r = log pi_old - log mu: the k3 estimate of KL(mu || pi_old) (>= 0, unbiased under mu),
    the mean ratio r (1 when equal), the mean and max |log r|, and the fraction of tokens with
    r outside [0.5, 2] (where truncated IS would matter). `off_policy/log_ratio_abs_max` is a
    maximum: reduce it with max, not a mean (the learner does)."""
    valid = loss_mask > 0
    n = valid.sum().clamp_min(1)
    log_ratio = torch.where(valid, old_logprobs.detach() - rollout_logprobs, torch.zeros_like(old_logprobs))
    ratio = log_ratio.exp()
    k3 = torch.where(valid, ratio - 1 - log_ratio, torch.zeros_like(ratio))
    outside = valid & (log_ratio.abs() > math.log(2.0))
    return {
        "off_policy/kl_k3": k3.sum() / n,
        "off_policy/is_ratio_mean": torch.where(valid, ratio, torch.zeros_like(ratio)).sum() / n,
        "off_policy/log_ratio_abs_mean": log_ratio.abs().sum() / n,
        "off_policy/log_ratio_abs_max": log_ratio.abs().max() if log_ratio.numel() else log_ratio.new_zeros(()),
        "off_policy/ratio_outside_frac": outside.sum() / n,
    }
