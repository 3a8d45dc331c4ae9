"""Policy losses as pure tensor functions over one typed input, selected by name from `POLICY_LOSSES`.

Every loss takes `LossInputs` (all [B, T], rows are sequences) and its own params dataclass and
returns `LossOutput(per_token_loss [B, T], metrics)`. The per-token loss is exactly zero where
`loss_mask == 0`, and nothing at those positions (logprobs, ratios, advantages) can leak into
the loss or its gradient. Reducing the matrix to a scalar is a separate named choice
(`trainer/aggregation.py`). Metrics are detached 0-dim tensors with namespaced keys; the caller
reduces and logs them.

Each registered entry declares the optional inputs it reads in `needs` (any of "entropy",
"clamped_entropy", "top_p_entropy", "ref_logprobs", "rollout_logprobs", "traj_ids",
"reinforce_mask", "turn_idx"), so the learner computes entropy whenever any configured term needs it
(not only when an entropy bonus is configured).

Two registries: `POLICY_LOSSES` (called as `fn(inputs)`, or `fn(inputs, **controller.loss_kwargs())`
for a loss with a `controller` flag such as BAPO) and `TOKEN_WEIGHTS` (STEER), which maps
`LossInputs` to `token_weights` that any loss then applies. Regularisers (entropy bonus, KL, AEnt,
EPO, SIREN, ...) take the same `LossInputs` and live in `trainer/regularizers.py`; the objective
(`trainer/objective.py`) aggregates each term and sums the scalars. Flags it reads:
`zero_at_zero_advantage` (samples whose advantages are all 0 can be skipped) and `reduce_metrics`
(metric key prefixes that are sums or maxima, not token means). `forking_token_mask` is the
80/20 token selection.
Each variant's docstring cites its paper by arXiv id and says where it departs from the paper or
the released code.

Batch statistics: Clip-Cov, KL-Cov, AEPO, HAPO and STEER read statistics
of the batch they are given (means, a std, a quantile, a max, a top-k). By default that is the
call's own tokens, one micro-batch, as the reference codes. For scope "global" the learner gathers
the valid tokens of the whole mini-batch on all ranks into a `TokenBatch`, computes the statistics
once with the entry's companion (registry flag `batch_stats`, bound by `batch_stats_fn`) and passes
them to every micro-batch's call as `batch_stats=`; the per-token losses then no longer depend on
how the mini-batch was cut into micro-batches.

This module knows nothing about models, configs, micro-batching or distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from trainer.registry import NoParams, Registry

POLICY_LOSSES = Registry("policy loss")


@dataclass
class LossInputs:
    """What every policy loss reads. Shapes: [B, T], one row per sequence.

    logprobs:         log pi_theta(a_t) of the current policy; requires grad.
    old_logprobs:     log pi_old(a_t), the policy the PPO ratio is taken against.
    advantages:       A_t, zero where loss_mask == 0.
    loss_mask:        1 exactly on tokens the policy sampled.
    rollout_logprobs: log-probs reported by the inference engine (off-policy correction).
    ref_logprobs:     log-probs of the frozen reference policy (KL terms).
    entropy:          H_t of the current policy (differentiable when a loss uses its gradient).
    clamped_entropy:  AEnt clamped entropy of the current policy (arXiv 2509.03493).
    token_weights:    per-token multipliers applied to the loss; set by a `TOKEN_WEIGHTS` hook
                      (STEER) via `with_token_weights`.
    traj_ids:         [B] long, episode id of each row (nested means over turns).
    top_p_entropy:    SIREN nucleus entropy H^p_t of the current policy (`top_p_entropy_from_logits`,
                      arXiv 2509.25133); differentiable.
    reinforce_mask:   1 on tokens of the extra temperature-switched samples of Arbitrary-Entropy
                      PO (arXiv 2510.08141), produced by the rollout hook in `trainer/sampling.py`.
    turn_idx:         [B] long, step-wise samples: the turn of its episode each row is (EPO's
                      per-turn entropy history, the released code's mode).
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    loss_mask: Tensor
    rollout_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    clamped_entropy: Tensor | None = None
    token_weights: Tensor | None = None
    traj_ids: Tensor | None = None
    top_p_entropy: Tensor | None = None
    reinforce_mask: Tensor | None = None
    turn_idx: Tensor | None = None

    def __post_init__(self) -> None:
        shape = self.logprobs.shape
        for name in (
            "old_logprobs",
            "advantages",
            "loss_mask",
            "rollout_logprobs",
            "ref_logprobs",
            "entropy",
            "clamped_entropy",
            "token_weights",
            "top_p_entropy",
            "reinforce_mask",
        ):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(
                    f"LossInputs.{name} has shape {tuple(value.shape)}, expected logprobs' "
                    f"{tuple(shape)} ([B, T])"
                )

    @property
    def valid(self) -> Tensor:
        """Boolean [B, T] view of loss_mask."""
        return self.loss_mask > 0


@dataclass
class LossOutput:
    per_token_loss: Tensor  # [B, T], zeros where loss_mask == 0
    metrics: dict[str, Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers


def masked_mean(values: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean of `values` over positions where loss_mask > 0 (0 when there are none)."""
    valid = loss_mask > 0
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp_min(1)


def _log_ratio(inputs: LossInputs, clamp: float) -> Tensor:
    """log(pi_theta / pi_old), clamped to [-clamp, clamp] and 0 at masked positions (verl's clamp)."""
    log_ratio = (inputs.logprobs - inputs.old_logprobs).clamp(-clamp, clamp)
    return torch.where(inputs.valid, log_ratio, torch.zeros_like(log_ratio))


def _advantages(inputs: LossInputs) -> Tensor:
    return torch.where(inputs.valid, inputs.advantages, torch.zeros_like(inputs.advantages))


def _finish(inputs: LossInputs, token_loss: Tensor, metrics: dict[str, Tensor]) -> LossOutput:
    """Apply token weights, zero masked positions, detach metrics."""
    if inputs.token_weights is not None:
        token_loss = token_loss * inputs.token_weights
    token_loss = torch.where(inputs.valid, token_loss, torch.zeros_like(token_loss))
    return LossOutput(token_loss, {k: v.detach() for k, v in metrics.items()})


def _ratio_metrics(inputs: LossInputs, log_ratio: Tensor, ratio: Tensor) -> dict[str, Tensor]:
    """KL(pi_old || pi_theta) estimators on samples from pi_old: k1 = -log r, k3 = r - 1 - log r."""
    mask = inputs.loss_mask
    return {
        "loss/approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
        "loss/approx_kl_k1": masked_mean(-log_ratio, mask),
        "loss/ratio_mean": masked_mean(ratio, mask),
    }


def _clipped_surrogate(
    advantages: Tensor, ratio: Tensor, clip_low: float, clip_high: float | Tensor
) -> tuple[Tensor, Tensor]:
    """max(-A r, -A clip(r, 1-eps_l, 1+eps_h)) and the mask of tokens where the clip binds."""
    unclipped = -advantages * ratio
    upper = 1 + clip_high
    bounded = ratio.clamp(min=1 - clip_low)
    bounded = torch.minimum(bounded, upper) if isinstance(upper, Tensor) else bounded.clamp(max=upper)
    clipped = -advantages * bounded
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _dual_clip(loss: Tensor, advantages: Tensor, dual_clip: float | None) -> tuple[Tensor, Tensor]:
    """For A < 0 cap the loss at -A * c (dual clip, arXiv 1912.09729); returns the new loss and
    where the cap binds."""
    if dual_clip is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    cap = -advantages * dual_clip
    binds = (advantages < 0) & (loss > cap)
    return torch.where(binds, cap, loss), binds


# --------------------------------------------------------------------------------------------
# Batch statistics and their scope


@dataclass
class TokenBatch:
    """The valid tokens (loss_mask == 1) of a batch, flat: 1-D tensors, one entry per token.

    For scope "global" the learner builds one per micro-batch with `token_batch` (from the same
    `LossInputs` the loss will see, policy mask included), joins them with `TokenBatch.cat` and
    all-gathers them over ranks. Token order does not matter to any statistic. `entropy` is
    needed only when `batch_stats_fn(...).needs` says so. The values may be upcast (e.g. to
    float64 for the gather): Clip-Cov and KL-Cov redo their selection tests in the statistics'
    dtype from the same values, so the selection stays bit-exact; a downcast would not.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    entropy: Tensor | None = None

    def __post_init__(self) -> None:
        size = self.logprobs.shape
        for name in ("logprobs", "old_logprobs", "advantages", "entropy"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 1 or value.shape != size):
                raise ValueError(
                    f"TokenBatch.{name} has shape {tuple(value.shape)}, expected 1-D like logprobs' "
                    f"{tuple(size)}"
                )

    @property
    def num_tokens(self) -> int:
        return self.logprobs.numel()

    @staticmethod
    def cat(parts: Sequence[TokenBatch]) -> TokenBatch:
        """Concatenate micro-batches (or ranks); entropy is kept only if every part has it."""
        if not parts:
            raise ValueError("TokenBatch.cat needs at least one part")
        entropies = [p.entropy for p in parts]
        return TokenBatch(
            torch.cat([p.logprobs for p in parts]),
            torch.cat([p.old_logprobs for p in parts]),
            torch.cat([p.advantages for p in parts]),
            None if any(e is None for e in entropies) else torch.cat(entropies),  # type: ignore[arg-type]
        )


def token_batch(inputs: LossInputs) -> TokenBatch:
    """The valid tokens of a [B, T] `LossInputs`, detached and flattened row by row."""
    valid = inputs.valid

    def pick(values: Tensor) -> Tensor:
        return values.detach()[valid]

    entropy = None if inputs.entropy is None else pick(inputs.entropy)
    return TokenBatch(pick(inputs.logprobs), pick(inputs.old_logprobs), pick(inputs.advantages), entropy)


BatchStats = dict[str, Tensor]


def _batch_statistic(
    needs: Iterable[str] = (), active: Callable[[Any], bool] = lambda params: True
) -> Callable[[Callable[..., BatchStats]], Callable[..., BatchStats]]:
    """Mark `fn(tokens, params) -> BatchStats` as the companion of a loss or hook.

    `needs`: the optional `TokenBatch` fields it reads (only "entropy" exists), so the pre-pass
    computes entropy only when needed. `active(params)`: False when the params switch the
    statistic off (AEPO with entropy_adv_coef = 0), so the learner can skip the pre-pass.
    """

    def mark(fn: Callable[..., BatchStats]) -> Callable[..., BatchStats]:
        fn.needs = frozenset(needs)  # type: ignore[attr-defined]
        fn.active = active  # type: ignore[attr-defined]
        return fn

    return mark


def batch_stats_fn(built: Callable[..., Any]) -> Callable[[TokenBatch], BatchStats] | None:
    """The global-scope companion of a loss or token-weight hook built by `Registry.build`.

    Returns `partial(companion, params=built.params)`, so `stats = fn(tokens)` and then
    `built(inputs, batch_stats=stats)` for every micro-batch; `.needs` on it is the frozenset of
    optional TokenBatch fields to fill. None when the entry has no `batch_stats` flag (its loss
    takes no `batch_stats` keyword: don't pass one) or when its params switch the statistic off.
    """
    flags: Mapping[str, Any] = getattr(built, "flags", {})
    companion = flags.get("batch_stats")
    if companion is None or not companion.active(built.params):  # type: ignore[attr-defined]
        return None
    bound = functools.partial(companion, params=built.params)  # type: ignore[attr-defined]
    bound.needs = companion.needs  # type: ignore[attr-defined]
    return bound


def _take(batch_stats: Mapping[str, Tensor], keys: Sequence[str], like: Tensor) -> list[Tensor]:
    """The named statistics, on `like`'s device; a clear error when the dict is not this loss's."""
    missing = [k for k in keys if k not in batch_stats]
    if missing:
        raise KeyError(
            f"batch_stats lacks {missing} (has {sorted(batch_stats)}): compute it with this "
            "loss's own companion, batch_stats_fn(loss)"
        )
    return [batch_stats[k].to(like.device) for k in keys]


def _flat_mean(values: Tensor) -> Tensor:
    """Mean of a 1-D tensor, 0 when empty (what `masked_mean` is over the valid tokens)."""
    return values.sum() / max(values.numel(), 1)


def _need_entropy(tokens: TokenBatch, who: str) -> Tensor:
    if tokens.entropy is None:
        raise ValueError(f"the batch statistics of {who} need TokenBatch.entropy")
    return tokens.entropy.detach()


def _quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile(values, q) (linear interpolation, same arithmetic) of a non-empty 1-D tensor.

    torch.quantile refuses inputs above 2**24 elements; a whole mini-batch can have more tokens.
    """
    ordered = values.sort().values
    rank = values.new_tensor(q) * (values.numel() - 1)
    below = rank.floor()
    return torch.lerp(ordered[below.long()], ordered[rank.ceil().long()], rank - below)


# --------------------------------------------------------------------------------------------
# PPO clip (vanilla surrogate; DAPO = clip_high 0.28 + token-mean aggregation, a preset)


@dataclass(frozen=True)
class PPOClipParams:
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    dual_clip: float | None = 3.0  # c > 1, applies only where A < 0; None disables
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")


@POLICY_LOSSES.register("ppo_clip", params=PPOClipParams, zero_at_zero_advantage=True)
def ppo_clip(inputs: LossInputs, params: PPOClipParams) -> LossOutput:
    """Clipped PPO surrogate, arXiv 1707.06347 Eq. 7, with the dual clip of arXiv 1912.09729 (verl "vanilla").

    l_t = max(-A r, -A clip(r, 1-eps_l, 1+eps_h)); for A < 0: l_t = min(l_t, -A c).
    r = exp(clamp(logp - old_logp, -20, 20)). Gradient is zero wherever a clip binds.
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    loss, clipped = _clipped_surrogate(advantages, ratio, params.clip_low, params.clip_high)
    loss, dual = _dual_clip(loss, advantages, params.dual_clip)
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/clipfrac"] = masked_mean(clipped.float(), inputs.loss_mask)
    metrics["loss/clipfrac_dual"] = masked_mean(dual.float(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)


@POLICY_LOSSES.register("nll")
def nll(inputs: LossInputs, params: NoParams) -> LossOutput:
    """Supervised fine-tuning: the negative log-likelihood -log pi_theta(a_t) of the target tokens
    (the loss mask: a demonstration's action or assistant tokens). Advantages and pi_old are not
    read: every token counts once, as in behaviour cloning (`entrorl sft`, `trainer/sft.py`)."""
    loss = -inputs.logprobs
    return _finish(inputs, loss, {"loss/nll": masked_mean(loss, inputs.loss_mask)})


# --------------------------------------------------------------------------------------------
# GSPO: sequence-level ratio


@dataclass(frozen=True)
class GSPOParams:
    clip_low: float = 3e-4  # paper §5.1 (math); ARLArena agents: 3e-3
    clip_high: float = 4e-4  # ARLArena agents: 4e-3
    log_ratio_clamp: float = 10.0  # upper clamp on log s_{i,t}


@POLICY_LOSSES.register(
    "gspo", params=GSPOParams, aggregation="seq-mean-token-mean", zero_at_zero_advantage=True
)
def gspo(inputs: LossInputs, params: GSPOParams) -> LossOutput:
    """GSPO, arXiv 2507.18071. Aggregate with seq-mean-token-mean (flag `aggregation`).

    s_i = exp(mean_t log(pi_theta / pi_old)) over the sampled tokens of row i;
    s_{i,t} = sg(s_i) * pi_theta(y_t) / sg(pi_theta(y_t)): forward = s_i, gradient s_i grad log pi.
    l_t = max(-A s_{i,t}, -A clip(s_{i,t}, 1-eps_l, 1+eps_h)); no dual clip.
    """
    valid = inputs.valid
    log_ratio = torch.where(valid, inputs.logprobs - inputs.old_logprobs, torch.zeros_like(inputs.logprobs))
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp_min(1)
    logprobs = torch.where(valid, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    log_token_ratio = logprobs - logprobs.detach() + seq_log_ratio.detach()
    ratio = torch.exp(log_token_ratio.clamp(max=params.log_ratio_clamp))
    advantages = _advantages(inputs)
    loss, clipped = _clipped_surrogate(advantages, ratio, params.clip_low, params.clip_high)
    token_log_ratio = log_ratio.detach().clamp(-20, 20)
    metrics = _ratio_metrics(inputs, token_log_ratio, torch.exp(token_log_ratio))
    metrics["loss/seq_ratio_mean"] = masked_mean(ratio, inputs.loss_mask)
    metrics["loss/clipfrac"] = masked_mean(clipped.float(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)


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
# CE-GPPO gradient-preserving clipping


def _check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


@dataclass(frozen=True)
class CEGPPOParams:
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta_low: float = 0.75  # beta1: scale kept on A < 0, r < 1 - eps_l (0 = PPO's zero gradient)
    beta_high: float = 1.0  # beta2: scale kept on A > 0, r > 1 + eps_h (0 = PPO's zero gradient)
    dual_clip: float | None = 3.0
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        _check_dual_clip(self.dual_clip)


@POLICY_LOSSES.register("ce_gppo", params=CEGPPOParams)
def ce_gppo(inputs: LossInputs, params: CEGPPOParams) -> LossOutput:
    """CE-GPPO gradient-preserving clipping, arXiv 2509.20712.

    A < 0, r < 1-eps_l: l = -beta1 (1-eps_l) (r / sg(r)) A  -> gradient -beta1 (1-eps_l) A grad log pi;
    A > 0, r > 1+eps_h: l = -beta2 (1+eps_h) (r / sg(r)) A  -> gradient -beta2 (1+eps_h) A grad log pi;
    otherwise l = -r A; then the dual clip for A < 0. The forward value at clipped tokens is
    scaled by beta too (unlike AEPO, whose gradient equals beta1 = 0, beta2 = 1).
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    unit = ratio / ratio.detach()  # value 1, gradient grad log pi
    low = (advantages < 0) & (ratio < 1 - params.clip_low)
    high = (advantages > 0) & (ratio > 1 + params.clip_high)
    loss = -advantages * ratio
    loss = torch.where(low, -params.beta_low * (1 - params.clip_low) * unit * advantages, loss)
    loss = torch.where(high, -params.beta_high * (1 + params.clip_high) * unit * advantages, loss)
    loss, dual = _dual_clip(loss, advantages, params.dual_clip)
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/clipfrac"] = masked_mean((low | high).float(), inputs.loss_mask)
    metrics["loss/clipfrac_low"] = masked_mean(low.float(), inputs.loss_mask)
    metrics["loss/clipfrac_dual"] = masked_mean(dual.float(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)


# --------------------------------------------------------------------------------------------
# BAPO adaptive clip bounds


@dataclass(frozen=True)
class BAPOParams:
    target: float = 1.0  # wanted P/N (the README's "rho0 = 0.5 of the total" is P/N = 1)
    low_start: float = 0.6  # explicit ratio bounds, not 1 -+ eps
    low_max: float = 0.8
    low_step: float = 0.05
    high_start: float = 1.2
    high_max: float = 2.0
    high_step: float = 0.05
    contribution: Literal["unclipped", "clamped"] = "unclipped"
    scope: Literal["batch", "step"] = "batch"
    dual_clip: float | None = 3.0
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        _check_dual_clip(self.dual_clip)
        for side in ("low", "high"):
            start, stop, step = (getattr(self, f"{side}_{k}") for k in ("start", "max", "step"))
            if not 0 < start <= stop or step <= 0:
                raise ValueError(
                    f"BAPO needs 0 < {side}_start <= {side}_max and {side}_step > 0, "
                    f"got {start}, {stop}, {step}"
                )


def bapo_grid(start: float, stop: float, step: float) -> list[float]:
    """Candidate bounds start, start + step, ..., the last one clamped to stop (as the BAPO code)."""
    n = math.ceil((stop - start) / step - 1e-9)
    return [min(start + i * step, stop) for i in range(n + 1)]


def bapo_contributions(
    ratio: Tensor, advantages: Tensor, loss_mask: Tensor, params: BAPOParams
) -> tuple[Tensor, Tensor]:
    """Grid sums (N[i] for each candidate c_low, P[j] for each candidate c_high), float64, detached.

    contribution="unclipped" (the paper's intent; monotone, so the search can succeed by raising
    c_low): P(c_h) = sum_{A>0, r<=c_h} r A, N(c_l) = sum_{A<0, r>=c_l} r |A|, the tokens that
    still get a gradient. contribution="clamped" (released code, ⚠ raising c_low then *raises*
    N): P = sum_{A>=0} min(r, c_h) A, N = sum_{A<0} |max(r, c_l) A|. Sums over ranks and
    micro-batches add up, so the search can run on globally reduced sums (`scope="step"`).
    """
    valid = loss_mask > 0
    r, adv = ratio.detach().double(), advantages.detach().double()
    lows = r.new_tensor(bapo_grid(params.low_start, params.low_max, params.low_step))[:, None]
    highs = r.new_tensor(bapo_grid(params.high_start, params.high_max, params.high_step))[:, None]
    pos_r, pos_a = r[valid & (adv > 0)][None], adv[valid & (adv > 0)][None]
    neg_r, neg_a = r[valid & (adv < 0)][None], -adv[valid & (adv < 0)][None]
    if params.contribution == "unclipped":
        pos = (pos_r * pos_a * (pos_r <= highs)).sum(-1)
        neg = (neg_r * neg_a * (neg_r >= lows)).sum(-1)
    else:
        pos = (torch.minimum(pos_r, highs) * pos_a).sum(-1)
        neg = (torch.maximum(neg_r, lows) * neg_a).sum(-1)
    return neg, pos


def bapo_search(neg: Tensor, pos: Tensor, params: BAPOParams) -> tuple[float, float]:
    """BAPO bound search, arXiv 2510.18927, on grid sums from `bapo_contributions`.

    From (c_low, c_high) = (low_start, high_start): raise c_low one step at a time while
    P/N < target and c_low < low_max; then raise c_high likewise. N = 0 counts as balanced.
    """
    lows = bapo_grid(params.low_start, params.low_max, params.low_step)
    highs = bapo_grid(params.high_start, params.high_max, params.high_step)
    i = j = 0

    def balanced() -> bool:
        return float(neg[i]) <= 0 or float(pos[j]) / float(neg[i]) >= params.target

    while not balanced() and i < len(lows) - 1:
        i += 1
    while not balanced() and j < len(highs) - 1:
        j += 1
    return lows[i], highs[j]


@POLICY_LOSSES.register("bapo", params=BAPOParams, controller="bapo", reduce_metrics={"bapo/": "sum"})
def bapo(
    inputs: LossInputs, params: BAPOParams, *, clip_bounds: tuple[float, float] | None = None
) -> LossOutput:
    """BAPO, arXiv 2510.18927: PPO with clip(r, c_low, c_high) and dual clip, bounds adapted
    so that positive-advantage tokens weigh at least `target` times the negative ones.

    scope="batch": bounds are searched on this call's tokens (micro-batch; the reference
    all-reduces over data-parallel ranks). scope="step": `controllers.BAPOController` searches
    on the previous step's reduced grid sums (metrics "bapo/neg_sum/<i>", "bapo/pos_sum/<j>")
    and passes `clip_bounds`; before its first update the batch search is used.
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    neg, pos = bapo_contributions(ratio, advantages, inputs.loss_mask, params)
    c_low, c_high = clip_bounds if clip_bounds is not None else bapo_search(neg, pos, params)
    loss, clipped = _clipped_surrogate(advantages, ratio, 1 - c_low, c_high - 1)
    loss, dual = _dual_clip(loss, advantages, params.dual_clip)
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/clipfrac"] = masked_mean(clipped.float(), inputs.loss_mask)
    metrics["loss/clipfrac_dual"] = masked_mean(dual.float(), inputs.loss_mask)
    metrics["loss/bapo_c_low"] = torch.tensor(float(c_low))
    metrics["loss/bapo_c_high"] = torch.tensor(float(c_high))
    if params.scope == "step":
        metrics.update({f"bapo/neg_sum/{i}": v for i, v in enumerate(neg)})
        metrics.update({f"bapo/pos_sum/{j}": v for j, v in enumerate(pos)})
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
