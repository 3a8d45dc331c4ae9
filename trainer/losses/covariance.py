"""Covariance-based entropy control, Cui et al. 2025 (arXiv 2505.22617): `clip_cov` and `kl_cov`.

Both score each valid token by Cov_t = (A_t - mean A) (log pi_t - mean log pi), the covariance
the paper finds behind the entropy change, and treat the highest-covariance tokens apart:
Clip-Cov drops the loss of a random subset of them, KL-Cov adds a |log r| penalty on the top-k.
Each has a global-scope companion (`clip_cov_batch_stats`, `kl_cov_batch_stats`) computing the
centring means and the selection over a whole mini-batch; the private helpers here are shared by
a loss and its companion, so both select the same tokens.
"""

from __future__ import annotations

import functools
import math
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
    _clipped_surrogate,
    _finish,
    _flat_mean,
    _log_ratio,
    _ratio_metrics,
    _take,
    masked_mean,
)

# --------------------------------------------------------------------------------------------
# Clip-Cov and KL-Cov (Cui et al. 2025)


def _centred_product(advantages: Tensor, logprobs: Tensor, adv_mean: Tensor, lp_mean: Tensor) -> Tensor:
    """Cov_t = (A_t - mean A) (log pi_t - mean log pi), elementwise, given the centring means
    (arXiv 2505.22617)."""
    return (advantages - adv_mean) * (logprobs - lp_mean)


def _covariance(inputs: LossInputs, advantages: Tensor) -> Tensor:
    """Cov_t centred on this call's valid tokens (scope micro-batch), detached, 0 where masked
    (arXiv 2505.22617)."""
    logprobs = torch.where(inputs.valid, inputs.logprobs.detach(), torch.zeros_like(advantages))
    means = masked_mean(advantages, inputs.loss_mask), masked_mean(logprobs, inputs.loss_mask)
    return torch.where(
        inputs.valid, _centred_product(advantages, logprobs, *means), torch.zeros_like(advantages)
    )


def _in_stats_dtype(values: Tensor, stat: Tensor) -> Tensor:
    """`values` detached, in the dtype the companion computed `stat` in: a selection test redone
    on the same values with the same arithmetic picks the same tokens (bit-exact)."""
    return values.detach().to(stat.dtype)


@dataclass(frozen=True)
class ClipCovParams:
    clip_ratio: float = 2e-4  # fraction of valid tokens whose gradient is removed
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    clip_low: float = 1.0  # paper runs PPO with eps = 1 on both sides
    clip_high: float = 1.0
    log_ratio_clamp: float = 20.0


def _clip_cov_candidates(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    means: tuple[Tensor, Tensor],
    params: ClipCovParams,
) -> Tensor:
    """Tokens Clip-Cov may drop (arXiv 2505.22617): PPO does not clip them and lb < Cov < ub.

    Elementwise, any shape; `means` = (mean A, mean log pi). Shared by the global companion and
    the loss, so both find the same candidates.
    """
    clamp = params.log_ratio_clamp
    ratio = torch.exp((logprobs - old_logprobs).clamp(-clamp, clamp))
    _, clipped = _clipped_surrogate(advantages, ratio, params.clip_low, params.clip_high)
    cov = _centred_product(advantages, logprobs, *means)
    return ~clipped & (cov > params.cov_lb) & (cov < params.cov_ub)


@_batch_statistic()
def clip_cov_batch_stats(tokens: TokenBatch, params: ClipCovParams) -> BatchStats:
    """Clip-Cov's statistics over a whole mini-batch (arXiv 2505.22617, scope global); see `clip_cov`.

    advantage_mean, logprob_mean: the centring means of Cov (dtype of the tokens);
    num_candidates: M, the candidates of the mini-batch; num_drop: n = max(1, floor(rho N)) with
    the global N (int64); drop_prob: min(n, M) / M, 0 when M = 0 (float64).
    """
    advantages, logprobs = tokens.advantages.detach(), tokens.logprobs.detach()
    means = _flat_mean(advantages), _flat_mean(logprobs)
    candidates = _clip_cov_candidates(logprobs, tokens.old_logprobs.detach(), advantages, means, params)
    count = int(candidates.sum())
    num_drop = max(1, int(params.clip_ratio * tokens.num_tokens))
    device = logprobs.device
    return {
        "advantage_mean": means[0],
        "logprob_mean": means[1],
        "num_candidates": torch.tensor(count, device=device),
        "num_drop": torch.tensor(num_drop, device=device),
        "drop_prob": torch.tensor(
            min(num_drop, count) / count if count else 0.0, dtype=torch.float64, device=device
        ),
    }


def _random_subset(candidates: Tensor, count: int) -> Tensor:
    """Bool mask of min(count, #candidates) candidates drawn uniformly (torch's global RNG)."""
    flat = torch.nonzero(candidates.flatten()).squeeze(1)
    chosen = flat[torch.randperm(flat.numel(), device=flat.device)[:count]]
    drop = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    drop[chosen] = True
    return drop.view_as(candidates)


def _clip_cov_global_drop(
    inputs: LossInputs, advantages: Tensor, params: ClipCovParams, batch_stats: BatchStats
) -> Tensor:
    """This call's share of the mini-batch's Clip-Cov draw (see `clip_cov`, scope global)."""
    keys = ("advantage_mean", "logprob_mean", "num_candidates", "num_drop", "drop_prob")
    adv_mean, lp_mean, count, num_drop, drop_prob = _take(batch_stats, keys, inputs.logprobs)
    as_stats = functools.partial(_in_stats_dtype, stat=lp_mean)
    args = as_stats(inputs.logprobs), as_stats(inputs.old_logprobs), as_stats(advantages)
    candidates = inputs.valid & _clip_cov_candidates(*args, (adv_mean, lp_mean), params)
    if int(candidates.sum()) == int(count):  # every candidate of the mini-batch is here: draw exactly
        return _random_subset(candidates, int(num_drop))
    coins = torch.rand(candidates.shape, dtype=torch.float64, device=candidates.device)
    return candidates & (coins < drop_prob)


@POLICY_LOSSES.register("clip_cov", params=ClipCovParams, batch_stats=clip_cov_batch_stats)
def clip_cov(
    inputs: LossInputs, params: ClipCovParams, *, batch_stats: BatchStats | None = None
) -> LossOutput:
    """Clip-Cov, arXiv 2505.22617: drop the loss of a random subset of high-covariance tokens.

    Candidates: valid tokens not already clipped by PPO with lb < Cov < ub. Pick
    n = max(1, floor(rho * N_valid)) of them uniformly at random (torch's global RNG: seed it)
    and zero their loss; the rest get the PPO surrogate. No dual clip.

    batch_stats=None (scope micro-batch, the reference): means, N and the draw are this call's.
    batch_stats from `clip_cov_batch_stats` (scope global): Cov is centred on the mini-batch's
    means, n uses its N, and the draw should be a uniform n-subset of its M candidates. A call
    sees only its own candidates, not their place among the M, so:
    - if it holds all M (e.g. a single micro-batch), it draws exactly min(n, M) of them, the
      very draw of the micro-batch path (same seed, same tokens: same result);
    - otherwise it drops each of its candidates independently with p = min(n, M) / M.
    Every candidate is thus dropped with probability min(n, M) / M, as under the exact global
    draw; the loss is linear in the per-token keep flags and so is the aggregation, hence the
    expected loss and gradient are exactly those of the exact global draw. Only the number
    dropped varies (Binomial(M, p), mean min(n, M)). An exact draw split over calls would need
    each token's index in the gathered mini-batch (or a shared per-token random key).
    """
    ratio_log = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(ratio_log)
    advantages = _advantages(inputs)
    loss, clipped = _clipped_surrogate(advantages, ratio, params.clip_low, params.clip_high)
    if batch_stats is None:
        cov = _covariance(inputs, advantages)
        candidates = inputs.valid & ~clipped & (cov > params.cov_lb) & (cov < params.cov_ub)
        drop = _random_subset(candidates, max(1, int(params.clip_ratio * int(inputs.valid.sum()))))
    else:
        drop = _clip_cov_global_drop(inputs, advantages, params, batch_stats)
    keep = (~drop).to(loss.dtype)
    loss = loss * keep
    metrics = _ratio_metrics(inputs, ratio_log, ratio)
    metrics["loss/clipfrac"] = masked_mean(clipped.float(), inputs.loss_mask)
    metrics["loss/cov_dropped_frac"] = masked_mean(1 - keep, inputs.loss_mask)
    return _finish(inputs, loss, metrics)


@dataclass(frozen=True)
class KLCovParams:
    kl_ratio: float = 2e-3  # fraction of valid tokens penalised (7B; 2e-4 for 32B)
    kl_coef: float = 1.0
    log_ratio_clamp: float = 20.0


@_batch_statistic()
def kl_cov_batch_stats(tokens: TokenBatch, params: KLCovParams) -> BatchStats:
    """KL-Cov's statistics over a whole mini-batch (arXiv 2505.22617, scope global); see `kl_cov`.

    advantage_mean, logprob_mean: the centring means of Cov; cov_threshold: the k-th largest
    Cov, k = max(1, floor(rho N)) with the global N (+inf without tokens). Dtype of the tokens.
    """
    advantages, logprobs = tokens.advantages.detach(), tokens.logprobs.detach()
    adv_mean, lp_mean = _flat_mean(advantages), _flat_mean(logprobs)
    cov = _centred_product(advantages, logprobs, adv_mean, lp_mean)
    if cov.numel():
        threshold = torch.topk(cov, max(1, int(params.kl_ratio * cov.numel()))).values[-1]
    else:
        threshold = cov.new_tensor(math.inf)
    return {"advantage_mean": adv_mean, "logprob_mean": lp_mean, "cov_threshold": threshold}


def _kl_cov_top_k(inputs: LossInputs, advantages: Tensor, params: KLCovParams) -> Tensor:
    """Scope micro-batch: the k = max(1, floor(rho N)) largest Cov of this call (ties arbitrary)."""
    num_valid = int(inputs.valid.sum())
    penalised = torch.zeros_like(advantages, dtype=torch.bool)
    if num_valid:
        cov = torch.where(
            inputs.valid, _covariance(inputs, advantages), torch.full_like(advantages, float("-inf"))
        )
        top = torch.topk(cov.flatten(), max(1, int(params.kl_ratio * num_valid))).indices
        penalised.view(-1)[top] = True
    return penalised


def _kl_cov_over_threshold(inputs: LossInputs, advantages: Tensor, batch_stats: BatchStats) -> Tensor:
    """Scope global: valid tokens whose Cov (mini-batch means) is >= the mini-batch's threshold."""
    keys = ("advantage_mean", "logprob_mean", "cov_threshold")
    adv_mean, lp_mean, threshold = _take(batch_stats, keys, inputs.logprobs)
    logprobs, advantages = _in_stats_dtype(inputs.logprobs, lp_mean), _in_stats_dtype(advantages, lp_mean)
    return inputs.valid & (_centred_product(advantages, logprobs, adv_mean, lp_mean) >= threshold)


@POLICY_LOSSES.register("kl_cov", params=KLCovParams, batch_stats=kl_cov_batch_stats)
def kl_cov(inputs: LossInputs, params: KLCovParams, *, batch_stats: BatchStats | None = None) -> LossOutput:
    """KL-Cov, arXiv 2505.22617: -A r everywhere, + beta |log r| on the top-k Cov tokens.

    k = max(1, floor(rho * N_valid)) largest covariances among valid tokens; no ratio clipping.
    batch_stats=None (scope micro-batch, the reference): means, N and top-k are this call's.
    batch_stats from `kl_cov_batch_stats` (scope global): Cov is centred on the mini-batch's
    means and a token is penalised when Cov >= the k-th largest Cov of the mini-batch (k from
    its N): the global top-k, except that every token tied with the k-th is penalised.
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    loss = -advantages * ratio
    if batch_stats is None:
        penalised = _kl_cov_top_k(inputs, advantages, params)
    else:
        penalised = _kl_cov_over_threshold(inputs, advantages, batch_stats)
    penalty = torch.where(penalised, params.kl_coef * log_ratio.abs(), torch.zeros_like(loss))
    loss = loss + penalty
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/cov_penalised_frac"] = masked_mean(penalised.float(), inputs.loss_mask)
    # what the penalty adds (0 while r = 1: one on-policy pass), as a token mean
    metrics["loss/kl_cov_penalty"] = masked_mean(penalty.detach(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)
