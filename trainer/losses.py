"""Policy losses as pure tensor functions over one typed input, selected by name from `POLICY_LOSSES`.

Every loss takes `LossInputs` (all [B, T], rows are sequences) and its own params dataclass and
returns `LossOutput(per_token_loss [B, T], metrics)`. The per-token loss is exactly zero where
`loss_mask == 0`, and nothing at those positions (logprobs, ratios, advantages) can leak into
the loss or its gradient. Reducing the matrix to a scalar is a separate named choice
(`trainer/aggregation.py`). Metrics are detached 0-dim tensors with namespaced keys; the caller
reduces and logs them.

Each registered entry declares the optional inputs it reads in `needs` (any of "entropy",
"clamped_entropy", "ref_logprobs", "rollout_logprobs", "traj_ids"), so the learner computes
entropy whenever any configured term needs it (algorithms.md §8.1).

Two registries: `POLICY_LOSSES` (called as `fn(inputs)`) and `REGULARIZERS` (entropy bonus, KL
to the reference, AEnt, EPO; called as `fn(inputs, **controller.loss_kwargs())` where a
controller from `trainer/controllers.py` supplies a coefficient or reference value). Both
return a per-token matrix; the learner aggregates each and sums the scalars.
The math of each variant is in research/algorithms.md (section cited per function).

This module knows nothing about models, configs, micro-batching or distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

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
    clamped_entropy:  AEnt clamped entropy of the current policy (algorithms.md §5).
    token_weights:    per-token multipliers applied to the loss (STEER/HAPO-style hooks).
    traj_ids:         [B] long, episode id of each row (nested means over turns).
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
    """log(pi_theta / pi_old), clamped to [-clamp, clamp] and 0 at masked positions (§0)."""
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
    """For A < 0 cap the loss at -A * c (§0); returns the new loss and where the cap binds."""
    if dual_clip is None:
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    cap = -advantages * dual_clip
    binds = (advantages < 0) & (loss > cap)
    return torch.where(binds, cap, loss), binds


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


@POLICY_LOSSES.register("ppo_clip", params=PPOClipParams)
def ppo_clip(inputs: LossInputs, params: PPOClipParams) -> LossOutput:
    """Clipped PPO surrogate with dual clip, algorithms.md §0 (verl "vanilla").

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


# --------------------------------------------------------------------------------------------
# GSPO: sequence-level ratio


@dataclass(frozen=True)
class GSPOParams:
    clip_low: float = 3e-4  # paper §5.1 (math); ARLArena agents: 3e-3
    clip_high: float = 4e-4  # ARLArena agents: 4e-3
    log_ratio_clamp: float = 10.0  # upper clamp on log s_{i,t}


@POLICY_LOSSES.register("gspo", params=GSPOParams, aggregation="seq-mean-token-mean")
def gspo(inputs: LossInputs, params: GSPOParams) -> LossOutput:
    """GSPO, algorithms.md §6.7. Aggregate with seq-mean-token-mean (flag `aggregation`).

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


def _covariance(inputs: LossInputs, advantages: Tensor) -> Tensor:
    """Cov_t = (A_t - mean A) (log pi_t - mean log pi) over the valid tokens, detached (§3)."""
    logprobs = torch.where(inputs.valid, inputs.logprobs.detach(), torch.zeros_like(advantages))
    centred_a = advantages - masked_mean(advantages, inputs.loss_mask)
    centred_lp = logprobs - masked_mean(logprobs, inputs.loss_mask)
    return torch.where(inputs.valid, centred_a * centred_lp, torch.zeros_like(advantages))


@dataclass(frozen=True)
class ClipCovParams:
    clip_ratio: float = 2e-4  # fraction of valid tokens whose gradient is removed
    cov_lb: float = 1.0
    cov_ub: float = 5.0
    clip_low: float = 1.0  # paper runs PPO with eps = 1 on both sides
    clip_high: float = 1.0
    log_ratio_clamp: float = 20.0


@POLICY_LOSSES.register("clip_cov", params=ClipCovParams)
def clip_cov(inputs: LossInputs, params: ClipCovParams) -> LossOutput:
    """Clip-Cov, algorithms.md §3: drop the loss of a random subset of high-covariance tokens.

    Among valid tokens not already clipped by PPO with lb < Cov < ub, pick
    max(1, floor(rho * N_valid)) uniformly at random (torch's global RNG: seed it) and zero
    their loss; the rest get the PPO surrogate. No dual clip. Statistics are over this batch.
    """
    ratio_log = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(ratio_log)
    advantages = _advantages(inputs)
    loss, clipped = _clipped_surrogate(advantages, ratio, params.clip_low, params.clip_high)
    cov = _covariance(inputs, advantages)
    candidates = inputs.valid & ~clipped & (cov > params.cov_lb) & (cov < params.cov_ub)
    num_drop = max(1, int(params.clip_ratio * int(inputs.valid.sum())))
    flat = torch.nonzero(candidates.flatten()).squeeze(1)
    chosen = flat[torch.randperm(flat.numel(), device=flat.device)[:num_drop]]
    keep = torch.ones(loss.numel(), dtype=loss.dtype, device=loss.device)
    keep[chosen] = 0
    loss = loss * keep.view_as(loss)
    metrics = _ratio_metrics(inputs, ratio_log, ratio)
    metrics["loss/clipfrac"] = masked_mean(clipped.float(), inputs.loss_mask)
    metrics["loss/cov_dropped_frac"] = masked_mean(1 - keep.view_as(loss), inputs.loss_mask)
    return _finish(inputs, loss, metrics)


@dataclass(frozen=True)
class KLCovParams:
    kl_ratio: float = 2e-3  # fraction of valid tokens penalised (7B; 2e-4 for 32B)
    kl_coef: float = 1.0
    log_ratio_clamp: float = 20.0


@POLICY_LOSSES.register("kl_cov", params=KLCovParams)
def kl_cov(inputs: LossInputs, params: KLCovParams) -> LossOutput:
    """KL-Cov, algorithms.md §3: -A r everywhere, + beta |log r| on the top-k Cov tokens.

    k = max(1, floor(rho * N_valid)) largest covariances among valid tokens; no ratio clipping.
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    loss = -advantages * ratio
    num_valid = int(inputs.valid.sum())
    penalised = torch.zeros_like(loss, dtype=torch.bool)
    if num_valid:
        cov = torch.where(inputs.valid, _covariance(inputs, advantages), torch.full_like(loss, float("-inf")))
        top = torch.topk(cov.flatten(), max(1, int(params.kl_ratio * num_valid))).indices
        penalised.view(-1)[top] = True
    loss = loss + torch.where(penalised, params.kl_coef * log_ratio.abs(), torch.zeros_like(loss))
    metrics = _ratio_metrics(inputs, log_ratio, ratio)
    metrics["loss/cov_penalised_frac"] = masked_mean(penalised.float(), inputs.loss_mask)
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


@POLICY_LOSSES.register(
    "aepo", params=AEPOParams, needs=lambda p: {"entropy"} if p.entropy_adv_coef else set()
)
def aepo(inputs: LossInputs, params: AEPOParams) -> LossOutput:
    """AEPO entropy-balanced policy optimisation (loss part), algorithms.md §2c.

    Upper clip bound (1+eps_h) r / sg(r): forward equals PPO, but a positive-advantage token
    above the bound keeps the gradient (1+eps_h) A grad log pi. Advantage is made entropy-aware:
    A (1 + a z), z = z-score of the current entropy over this batch's valid tokens (detached;
    std 0 -> 1). Entropy is always computed when a != 0 (the reference code's silent skip is a bug).
    """
    log_ratio = _log_ratio(inputs, params.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    advantages = _advantages(inputs)
    if params.entropy_adv_coef:
        if inputs.entropy is None:
            raise ValueError("aepo with entropy_adv_coef != 0 needs LossInputs.entropy")
        entropy = torch.where(inputs.valid, inputs.entropy.detach(), torch.zeros_like(advantages))
        valid_entropy = entropy[inputs.valid]
        std = valid_entropy.std() if valid_entropy.numel() > 1 else entropy.new_zeros(())
        std = torch.where(std > 0, std, torch.ones_like(std))
        z = (entropy - masked_mean(entropy, inputs.loss_mask)) / std
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
# Token selection: the 80/20 forking-token mask


def forking_token_mask(
    entropy: Tensor, loss_mask: Tensor, top_ratio: float = 0.2, *, threshold: float | Tensor | None = None
) -> Tensor:
    """Keep only the highest-entropy "forking" tokens, algorithms.md §4. Returns [B, T] in {0, 1}.

    Default: the top k = max(1, ceil(top_ratio * N_valid)) valid tokens of this batch by entropy
    (ties arbitrary, as torch.topk). With `threshold` (e.g. a quantile gathered over the whole
    mini-batch, §8.2 scope=global) keep valid tokens with entropy >= threshold instead.
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


# --------------------------------------------------------------------------------------------
# Regularisers: entropy bonus, KL to the reference, AEnt, EPO.
# Called as fn(inputs, **controller.loss_kwargs()); aggregate each with the policy loss's mode
# (verl/EPO code; AEnt's paper uses token-mean).

REGULARIZERS = Registry("regularizer")


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3", clamp: float | None = 10.0
) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on samples of pi_theta, algorithms.md §6.1.

    With d = log pi_ref - log pi_theta: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 ("low_var_kl",
    clamped to [-clamp, clamp]). Differentiable w.r.t. logprobs.
    """
    diff = ref_logprobs - logprobs
    if kind == "k1":
        return -diff
    if kind == "k2":
        return 0.5 * diff**2
    if kind == "k3":
        kl = torch.exp(diff.clamp(max=20.0)) - diff - 1
        return kl.clamp(-clamp, clamp) if clamp is not None else kl
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def _require(inputs: LossInputs, name: str, term: str) -> Tensor:
    value = getattr(inputs, name)
    if value is None:
        raise ValueError(f"regularizer {term!r} needs LossInputs.{name}")
    return torch.where(inputs.valid, value, torch.zeros_like(value))


@dataclass(frozen=True)
class EntropyBonusParams:
    coef: float = 1e-3


@REGULARIZERS.register("entropy_bonus", params=EntropyBonusParams, needs={"entropy"})
def entropy_bonus(inputs: LossInputs, params: EntropyBonusParams, *, coef: float | None = None) -> LossOutput:
    """Plain entropy bonus: per-token loss -coef * H_t (algorithms.md §0)."""
    entropy = _require(inputs, "entropy", "entropy_bonus")
    coef = params.coef if coef is None else coef
    return _finish(inputs, -coef * entropy, {"entropy/mean": masked_mean(entropy, inputs.loss_mask)})


@dataclass(frozen=True)
class KLParams:
    coef: float = 1e-3
    kind: Literal["k1", "k2", "k3"] = "k3"
    clamp: float | None = 10.0
    target: float | None = None  # set to adapt coef towards this KL (controllers.AdaptiveKLController)
    horizon: int = 10000


@REGULARIZERS.register("kl", params=KLParams, needs={"ref_logprobs"}, controller="adaptive_kl")
def kl_penalty(inputs: LossInputs, params: KLParams, *, coef: float | None = None) -> LossOutput:
    """KL to the reference policy as a loss term: coef * k_t, algorithms.md §6.1."""
    ref = _require(inputs, "ref_logprobs", "kl")
    logprobs = torch.where(inputs.valid, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    kl = kl_estimate(logprobs, ref, params.kind, params.clamp)
    coef = params.coef if coef is None else coef
    return _finish(inputs, coef * kl, {"loss/kl_ref": masked_mean(kl, inputs.loss_mask)})


@dataclass(frozen=True)
class AEntParams:
    coef: float = 1e-3  # c_0
    drop_frac: float = 0.2  # p: fraction of the vocabulary (smallest logits) removed
    adaptive: bool = False
    entropy_low: float = 0.1
    entropy_high: float = 0.5
    coef_lr: float = 1e-3  # eta
    coef_min: float = 1e-5
    coef_max: float = 1e-2
    warmup_steps: int = 0


@REGULARIZERS.register("aent", params=AEntParams, needs={"clamped_entropy"}, controller="aent")
def aent(inputs: LossInputs, params: AEntParams, *, coef: float | None = None) -> LossOutput:
    """AEnt clamped-entropy bonus, algorithms.md §5: per-token loss -c_k * H~_t.

    H~ comes from `logprobs.token_stats_from_hidden(..., clamp_drop_frac=params.drop_frac)`;
    c_k from `controllers.AEntController` (reads metric "entropy/clamped_mean").
    """
    clamped = _require(inputs, "clamped_entropy", "aent")
    coef = params.coef if coef is None else coef
    metrics = {"entropy/clamped_mean": masked_mean(clamped, inputs.loss_mask)}
    return _finish(inputs, -coef * clamped, metrics)


@dataclass(frozen=True)
class EPOParams:
    coef: float = 1e-3  # lambda
    alpha: float = 0.1  # penalty weight (0.05 ScienceWorld, 0.1 ALFWorld)
    kappa_low: float = 0.0
    kappa_high: float = 2.0
    gamma: float = 3.0  # beta_k = 1 + exp(-gamma k / floor(K/2))
    penalty: Literal["hinge", "indicator"] = "hinge"  # paper v2 | released code (no gradient)


@REGULARIZERS.register("epo", params=EPOParams, needs={"entropy"}, controller="epo")
def epo(
    inputs: LossInputs, params: EPOParams, *, entropy_ref: float | None = None, beta: float = 1.0
) -> LossOutput:
    """EPO entropy regulariser, algorithms.md §1: per-token loss -lambda (H - beta alpha P).

    P = [kappa_l Href - H]_+ + [H - kappa_r Href]_+ (hinge, differentiable) or, with
    penalty="indicator", the released code's constant 1[H <= kappa_l Href or H >= kappa_r Href].
    Href (cumulative mean of past steps' mean entropy) and beta_k come from
    `controllers.EPOController`; at step 0 (entropy_ref None) the smoothing term is 0.
    """
    entropy = _require(inputs, "entropy", "epo")
    penalty = torch.zeros_like(entropy)
    if entropy_ref is not None:
        low, high = params.kappa_low * entropy_ref, params.kappa_high * entropy_ref
        if params.penalty == "hinge":
            penalty = torch.relu(low - entropy) + torch.relu(entropy - high)
        else:
            penalty = ((entropy <= low) | (entropy >= high)).to(entropy.dtype).detach()
    loss = -params.coef * (entropy - beta * params.alpha * penalty)
    metrics = {
        "entropy/mean": masked_mean(entropy, inputs.loss_mask),
        "loss/epo_penalty": masked_mean(penalty, inputs.loss_mask),
    }
    return _finish(inputs, loss, metrics)
