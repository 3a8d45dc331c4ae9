"""PPO-style clipped surrogates: fixed bounds, and the variants that move the bounds or keep a
gradient past them. None of them reads a batch statistic.

- `ppo_clip`: the clipped surrogate of arXiv 1707.06347 with the dual clip of arXiv 1912.09729
  (DAPO, arXiv 2503.14476, is a preset of it: clip_high 0.28 + token-mean aggregation);
- `nll`: supervised fine-tuning on the same `LossInputs` (no ratio, no advantage);
- `gspo`: the sequence-level ratio of GSPO, arXiv 2507.18071;
- `ce_gppo`: CE-GPPO's gradient-preserving clipping, arXiv 2509.20712;
- `bapo`: BAPO's adaptive clip bounds, arXiv 2510.18927, with the grid search (`bapo_grid`,
  `bapo_contributions`, `bapo_search`) that `controllers.BAPOController` also runs for scope "step".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trainer.losses.base import (
    POLICY_LOSSES,
    LossInputs,
    LossOutput,
    _advantages,
    _check_dual_clip,
    _clipped_surrogate,
    _dual_clip,
    _finish,
    _log_ratio,
    _ratio_metrics,
    masked_mean,
)
from trainer.registry import NoParams

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
# CE-GPPO gradient-preserving clipping


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
