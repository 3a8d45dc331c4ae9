"""Clipped losses shaped by the policy's per-token entropy: `aepo` (arXiv 2510.14545) and `hapo`
(arXiv 2509.16591).

AEPO makes the advantage entropy-aware, A (1 + a z_H), and keeps a gradient above the upper clip
bound; HAPO widens each token's clip bounds and redistributes its advantage by a normalised
entropy signal (`hapo_entropy_signal`). Both read `LossInputs.entropy` (AEPO only when
entropy_adv_coef != 0) and have global-scope companions (`aepo_batch_stats`, `hapo_batch_stats`)
for the entropy statistics of a whole mini-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.losses.base import (
    POLICY_LOSSES,
    BatchStats,
    LossInputs,
    LossOutput,
    TokenBatch,
    _advantages,
    _batch_statistic,
    _check_dual_clip,
    _clipped_surrogate,
    _dual_clip,
    _finish,
    _flat_mean,
    _log_ratio,
    _need_entropy,
    _quantile,
    _ratio_metrics,
    _take,
    masked_mean,
)

# --------------------------------------------------------------------------------------------
# AEPO entropy-balanced clipping


@dataclass(frozen=True)
class AEPOParams:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    entropy_adv_coef: float = 0.2  # a in A (1 + a z_H); 0 turns the entropy-aware advantage off
    log_ratio_clamp: float = 20.0


def _entropy_std(valid_entropy: Tensor) -> Tensor:
    """Unbiased std of the valid tokens' entropy, 0 for fewer than two tokens (AEPO's z-score)."""
    return valid_entropy.std() if valid_entropy.numel() > 1 else valid_entropy.new_zeros(())


@_batch_statistic(needs={"entropy"}, active=lambda params: params.entropy_adv_coef != 0)
def aepo_batch_stats(tokens: TokenBatch, params: AEPOParams) -> BatchStats:
    """AEPO's entropy z-score statistics over a whole mini-batch (arXiv 2510.14545, scope global).

    entropy_mean and entropy_std (unbiased, 0 for < 2 tokens; the loss maps 0 to 1) of the
    current entropy over the mini-batch's valid tokens; `aepo` with these uses z over the
    mini-batch. Inactive (batch_stats_fn gives None) when entropy_adv_coef = 0.
    """
    entropy = _need_entropy(tokens, "aepo")
    return {"entropy_mean": _flat_mean(entropy), "entropy_std": _entropy_std(entropy)}


def _aepo_entropy_z(inputs: LossInputs, batch_stats: BatchStats | None) -> Tensor:
    """z-score of the detached entropy: over this call's valid tokens, or with the mini-batch's
    mean and std from `batch_stats` (std 0 -> 1); [B, T], 0 at masked positions before centring."""
    if inputs.entropy is None:
        raise ValueError("aepo with entropy_adv_coef != 0 needs LossInputs.entropy")
    entropy = torch.where(inputs.valid, inputs.entropy.detach(), torch.zeros_like(inputs.advantages))
    if batch_stats is None:
        mean, std = masked_mean(entropy, inputs.loss_mask), _entropy_std(entropy[inputs.valid])
    else:
        mean, std = _take(batch_stats, ("entropy_mean", "entropy_std"), entropy)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (entropy - mean) / std


@POLICY_LOSSES.register(
    "aepo",
    params=AEPOParams,
    needs=lambda p: {"entropy"} if p.entropy_adv_coef else set(),
    batch_stats=aepo_batch_stats,
)
def aepo(inputs: LossInputs, params: AEPOParams, *, batch_stats: BatchStats | None = None) -> LossOutput:
    """AEPO entropy-balanced policy optimisation (loss part), arXiv 2510.14545.

    Upper clip bound (1+eps_h) r / sg(r): forward equals PPO, but a positive-advantage token
    above the bound keeps the gradient (1+eps_h) A grad log pi. Advantage is made entropy-aware:
    A (1 + a z), z = z-score of the current entropy over this batch's valid tokens (detached;
    std 0 -> 1). Entropy is always computed when a != 0 (the reference code's silent skip is a bug).
    batch_stats=None: z over this call's tokens (micro-batch, the reference); from
    `aepo_batch_stats`: z with the whole mini-batch's mean and std (scope global).
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    if params.entropy_adv_coef:
        z = _aepo_entropy_z(inputs, batch_stats)
        advantages = advantages * (1 + params.entropy_adv_coef * z)
    unit = ratio / ratio.detach()  # value 1, gradient grad log pi
    upper = (1 + params.clip_high) * unit - 1  # as an eps_h: the bound is (1+eps_h) r / sg(r)
    loss, clipped = _clipped_surrogate(advantages, ratio, params.clip_low, upper)
    loss, dual = _dual_clip(loss, advantages, params.dual_clip)
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/clipfrac"] = masked_mean(clipped.float(), inputs.loss_mask)
    metrics["loss/clipfrac_dual"] = masked_mean(dual.float(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)


# --------------------------------------------------------------------------------------------
# HAPO asymmetric adaptive clipping + differential advantage redistribution


_HAPO_EPS = 1e-8  # entropy floor before the log, and floor of the max / |min| deviation


def hapo_entropy_signal(
    entropy: Tensor,
    loss_mask: Tensor,
    pivot: float = 0.8,
    eps: float = _HAPO_EPS,
    *,
    batch_stats: BatchStats | None = None,
) -> Tensor:
    """HAPO's normalised entropy h in [-1, 1], arXiv 2509.16591; [B, T], 0 at masked tokens.

    d = log H - q-quantile(log H) over this batch's valid tokens (linear interpolation);
    h = d / max(d) where d > 0, d / |min(d)| where d < 0. (The paper's division by the RMS
    deviation cancels in this scaling, so it is skipped.) Detached.
    batch_stats=None: quantile, max and min over these tokens (micro-batch, the reference); from
    `hapo_batch_stats`: over the whole mini-batch (scope global), so `pivot` is not used.
    """
    valid = loss_mask > 0
    log_h = torch.log(entropy.detach().clamp_min(eps))
    if not valid.any():
        return torch.zeros_like(log_h)
    if batch_stats is None:
        d = log_h - torch.quantile(log_h[valid], pivot)
        d = torch.where(valid, d, torch.zeros_like(d))
        # max/min include the zeros at masked positions: harmless, top is used only where some
        # d > 0 (then max d > 0 anyway), bottom only where some d < 0.
        top, bottom = d.max(), d.min()
    else:
        keys = ("log_entropy_pivot", "deviation_max", "deviation_min")
        quantile, top, bottom = _take(batch_stats, keys, log_h)
        d = torch.where(valid, log_h - quantile, torch.zeros_like(log_h))
    h = torch.where(d > 0, d / top.clamp_min(eps), d / (-bottom).clamp_min(eps))
    return torch.where(d == 0, torch.zeros_like(h), h)


@dataclass(frozen=True)
class HAPOParams:
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_alpha: float = (
        1.0  # alpha: eps_h' = eps_h (1 + alpha h) for h > 0; eps_l' = eps_l (1 - alpha h) for h <= 0
    )
    adv_beta: float = 1.0  # beta: A' = A (1 + beta h)
    entropy_pivot: float = 0.8
    dual_clip: float | None = 10.0
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        _check_dual_clip(self.dual_clip)


@_batch_statistic(needs={"entropy"})
def hapo_batch_stats(tokens: TokenBatch, params: HAPOParams) -> BatchStats:
    """HAPO's entropy statistics over a whole mini-batch (arXiv 2509.16591, scope global).

    log_entropy_pivot: the entropy_pivot-quantile of log H (linear interpolation, as
    torch.quantile); deviation_max, deviation_min: max and min of d = log H - pivot. All over
    the mini-batch's valid tokens (0 without tokens); `hapo_entropy_signal` scales d by them.
    """
    log_h = torch.log(_need_entropy(tokens, "hapo").clamp_min(_HAPO_EPS))
    if not log_h.numel():
        zero = log_h.new_zeros(())
        return {"log_entropy_pivot": zero, "deviation_max": zero, "deviation_min": zero}
    quantile = _quantile(log_h, params.entropy_pivot)
    d = log_h - quantile
    return {"log_entropy_pivot": quantile, "deviation_max": d.max(), "deviation_min": d.min()}


@POLICY_LOSSES.register("hapo", params=HAPOParams, needs={"entropy"}, batch_stats=hapo_batch_stats)
def hapo(inputs: LossInputs, params: HAPOParams, *, batch_stats: BatchStats | None = None) -> LossOutput:
    """HAPO loss, arXiv 2509.16591 (pair with advantage "hapo" for the token-level group mean).

    h = `hapo_entropy_signal` of the current entropy. High-entropy tokens (h > 0) get a wider
    upper bound eps_h (1 + alpha h), low-entropy ones (h <= 0) a wider lower bound
    eps_l (1 - alpha h). A' = A (1 + beta h), applied for h > 0 only when r is outside the
    neutral band (1 - eps_l'/2, 1 + eps_h'/2), for h <= 0 only inside it. Then
    max(-A' r, -A' clip(r, 1-eps_l', 1+eps_h')) and the dual clip.
    batch_stats=None: h from this call's tokens (micro-batch, the reference); from
    `hapo_batch_stats`: from the whole mini-batch's quantile and range (scope global).
    """
    if inputs.entropy is None:
        raise ValueError("hapo needs LossInputs.entropy")
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    h = hapo_entropy_signal(
        inputs.entropy, inputs.loss_mask, params.entropy_pivot, batch_stats=batch_stats
    ).to(ratio.dtype)
    high_entropy = h > 0
    eps_h = torch.where(high_entropy, params.clip_high * (1 + params.clip_alpha * h), params.clip_high)
    eps_l = torch.where(high_entropy, params.clip_low, params.clip_low * (1 - params.clip_alpha * h))
    r = ratio.detach()
    inside = (r > 1 - eps_l / 2) & (r < 1 + eps_h / 2)
    redistribute = torch.where(high_entropy, ~inside, inside)
    advantages = torch.where(redistribute, advantages * (1 + params.adv_beta * h), advantages)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.minimum(torch.maximum(ratio, 1 - eps_l), 1 + eps_h)
    loss = torch.maximum(unclipped, clipped)
    loss, dual = _dual_clip(loss, advantages, params.dual_clip)
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/clipfrac"] = masked_mean((clipped > unclipped).float(), inputs.loss_mask)
    metrics["loss/clipfrac_dual"] = masked_mean(dual.float(), inputs.loss_mask)
    metrics["loss/hapo_high_entropy_frac"] = masked_mean(high_entropy.float(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)
