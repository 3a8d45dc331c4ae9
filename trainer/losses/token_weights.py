"""Per-token reweighting and selection, applied on top of whichever policy loss is configured.

`TOKEN_WEIGHTS` is the second registry: a hook maps `LossInputs` to `token_weights`
(`TokenWeightOutput`), which `with_token_weights` folds into the inputs and `_finish` multiplies
into the loss. Its entry is `steer` (STEER, arXiv 2510.10150), with the global-scope companion
`steer_batch_stats`. `forking_token_mask` (arXiv 2506.01939) is the 80/20 forking-token
selection: not a weight but a narrower loss mask for the policy loss and its aggregation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from trainer.losses.base import (
    BatchStats,
    LossInputs,
    TokenBatch,
    _advantages,
    _batch_statistic,
    _need_entropy,
    _take,
    masked_mean,
)
from trainer.registry import Registry

# --------------------------------------------------------------------------------------------
# Token-weight hooks (STEER): LossInputs -> token_weights, usable with any policy loss

TOKEN_WEIGHTS = Registry("token weighting")


@dataclass
class TokenWeightOutput:
    token_weights: Tensor  # [B, T], detached, zero where loss_mask == 0
    metrics: dict[str, Tensor] = field(default_factory=dict)


def with_token_weights(inputs: LossInputs, weights: Tensor) -> LossInputs:
    """A copy of `inputs` whose token_weights are multiplied by `weights` (hooks compose)."""
    current = inputs.token_weights
    return dataclasses.replace(inputs, token_weights=weights if current is None else current * weights)


@dataclass(frozen=True)
class STEERParams:
    mode: Literal["exponential", "linear"] = "exponential"
    weight_min: float = 0.8
    weight_max: float = 1.0  # linear mode only; the exponential map tops out at 1
    omega_floor: float = 0.02  # kappa = -ln(w_min) / max(max |Omega|, floor)


def _steer_omega(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, entropy: Tensor) -> Tensor:
    """Omega_t = (A_t / pi_old) pi (1 - pi) (log pi + H_t), elementwise (STEER, arXiv 2510.10150)."""
    prob = logprobs.exp()
    return (advantages * torch.exp(-old_logprobs)) * prob * (1 - prob) * (logprobs + entropy)


@_batch_statistic(needs={"entropy"})
def steer_batch_stats(tokens: TokenBatch, params: STEERParams) -> BatchStats:
    """STEER's normalisers over a whole mini-batch (arXiv 2510.10150, scope global).

    omega_max, omega_min: max and min of |Omega| over the mini-batch's valid tokens (0 without
    tokens); the exponential map uses the max (kappa), the linear one both.
    """
    entropy = _need_entropy(tokens, "steer")
    size = _steer_omega(
        tokens.logprobs.detach(), tokens.old_logprobs.detach(), tokens.advantages.detach(), entropy
    ).abs()
    if not size.numel():
        return {"omega_max": size.new_zeros(()), "omega_min": size.new_zeros(())}
    return {"omega_max": size.max(), "omega_min": size.min()}


@TOKEN_WEIGHTS.register("steer", params=STEERParams, needs={"entropy"}, batch_stats=steer_batch_stats)
def steer(
    inputs: LossInputs, params: STEERParams, *, batch_stats: BatchStats | None = None
) -> TokenWeightOutput:
    """STEER token reweighting, arXiv 2510.10150: down-weight tokens whose update would move
    the entropy most.

    Omega_t = (A_t / pi_old) pi (1 - pi) (log pi + H_t), detached, over this batch's valid tokens.
    exponential: w = clip(exp(-kappa |Omega|), w_min, 1), kappa = -ln(w_min) / max(max|Omega|, floor);
    linear: w = w_max - (|Omega| - min) / (max - min) (w_max - w_min) (w_max when max == min).
    Apply with `with_token_weights(inputs, out.token_weights)` before calling the loss.
    batch_stats=None: max and min over this call's tokens (micro-batch, the reference); from
    `steer_batch_stats`: over the whole mini-batch (scope global).
    """
    if inputs.entropy is None:
        raise ValueError("token weighting 'steer' needs LossInputs.entropy")
    valid = inputs.valid
    zero = torch.zeros_like(inputs.logprobs.detach())
    logprobs = torch.where(valid, inputs.logprobs.detach(), zero)
    old = torch.where(valid, inputs.old_logprobs.detach(), zero)
    entropy = torch.where(valid, inputs.entropy.detach(), zero)
    omega = _steer_omega(logprobs, old, _advantages(inputs).detach(), entropy)
    size = torch.where(valid, omega.abs(), zero)
    if not valid.any():
        return TokenWeightOutput(zero, {})
    if batch_stats is None:
        top, bottom = size[valid].max(), size[valid].min()
    else:
        top, bottom = _take(batch_stats, ("omega_max", "omega_min"), size)
    if params.mode == "exponential":
        kappa = -math.log(params.weight_min) / top.clamp_min(params.omega_floor)
        weights = torch.exp(-kappa * size).clamp(params.weight_min, 1.0)
    else:
        spread = params.weight_max - params.weight_min
        scaled = (size - bottom) / (top - bottom) if top > bottom else zero
        weights = params.weight_max - scaled * spread
    weights = torch.where(valid, weights, zero)
    metrics = {"loss/steer_weight_mean": masked_mean(weights, inputs.loss_mask), "loss/steer_omega_max": top}
    return TokenWeightOutput(weights, metrics)


# --------------------------------------------------------------------------------------------
# Token selection: the 80/20 forking-token mask


def forking_token_mask(
    entropy: Tensor, loss_mask: Tensor, top_ratio: float = 0.2, *, threshold: float | Tensor | None = None
) -> Tensor:
    """Keep only the highest-entropy "forking" tokens, arXiv 2506.01939. Returns [B, T] in {0, 1}.

    Default: the top k = max(1, ceil(top_ratio * N_valid)) valid tokens of this batch by entropy
    (ties arbitrary, as torch.topk). With `threshold` (e.g. a quantile gathered over the whole
    mini-batch, scope=global) keep valid tokens with entropy >= threshold instead.
    Use the result as `loss_mask` of the policy loss AND of its aggregation (token-mean then
    divides by the selected count); KL/entropy regularisers keep the full loss_mask.
    """
    valid = loss_mask > 0
    entropy = entropy.detach()
    if threshold is not None:
        return (valid & (entropy >= threshold)).to(loss_mask.dtype)
    num_valid = int(valid.sum())
    selected = torch.zeros_like(valid)
    if num_valid:
        k = max(1, math.ceil(top_ratio * num_valid))
        scores = torch.where(valid, entropy, torch.full_like(entropy, float("-inf")))
        selected.view(-1)[torch.topk(scores.flatten(), k).indices] = True
    return selected.to(loss_mask.dtype)
