"""The core every policy loss shares: its inputs and output, its helpers, and batch statistics.

`POLICY_LOSSES` (the registry the family modules `clipped`, `covariance` and `entropy` fill),
`LossInputs` and `LossOutput` (the contract in the package docstring), `masked_mean` and the
private helpers the losses are built from: the clamped log-ratio, masked advantages, `_finish`
(token weights, mask, detached metrics), the KL estimators of the ratio, the clipped surrogate
(arXiv 1707.06347) and the dual clip (arXiv 1912.09729). The regularisers
(`trainer/regularizers.py`) build on `_advantages` and `_finish` too.

Then the batch statistics and their scope (package docstring, "Batch statistics"): `TokenBatch`
and `token_batch`, the `_batch_statistic` marker of a loss's companion, `batch_stats_fn`, which
binds one to built params, and the helpers the companions share (`_take`, `_flat_mean`,
`_need_entropy`, `_quantile`). They are here, not with one loss, because Clip-Cov, KL-Cov,
AEPO, HAPO and STEER all use them.

This module knows nothing about models, configs, micro-batching or distribution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer.registry import Registry

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


def _check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


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
