"""Regularisers: loss terms added to the policy loss, selected by name from `REGULARIZERS`.

Entropy bonus, KL to a frozen reference, AEnt (clamped entropy), EPO (entropy smoothing), SIREN
(selective entropy around a self-anchor) and Arbitrary-Entropy PO's temperature REINFORCE term.
Each takes the same `LossInputs` as the policy losses (`trainer/losses/`) plus its own params
dataclass and returns `LossOutput(per_token_loss [B, T], metrics)`, exactly zero where
`loss_mask == 0`. Cross-step values (a coefficient, a reference entropy, an anchor) arrive as
keyword arguments from the regulariser's controller (`trainer/controllers.py`):
`fn(inputs, **controller.loss_kwargs())`.

Each entry declares the inputs it reads in `needs` ("entropy", "clamped_entropy",
"top_p_entropy", "ref_logprobs", "reinforce_mask"); the learner computes them whenever a
configured term needs them, and the entropy it passes here is differentiable (these terms use
its gradient). Flags: `controller` (which controller `make_controller` builds) and
`aggregation` (a mode the term must be aggregated with, e.g. SIREN's seq-mean-token-mean);
without the flag a term is aggregated with the policy loss's mode (verl/EPO code; AEnt's paper
uses token-mean). Each term's docstring cites its paper by arXiv id and says where it departs
from the paper or the released code.

This module knows nothing about models, configs, micro-batching or distribution.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trainer.losses import LossInputs, LossOutput, _advantages, _finish, masked_mean
from trainer.registry import Registry

REGULARIZERS = Registry("regularizer")


KLKind = Literal["k1", "k2", "k3", "abs", "k1+", "k3+"]
KL_KINDS: tuple[str, ...] = typing.get_args(KLKind)


def kl_estimate(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3", clamp: float | None = 10.0
) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on samples of pi_theta; differentiable
    w.r.t. `logprobs`. With r = log pi_theta - log pi_ref (= -d, d = log pi_ref - log pi_theta):

      k1   r                         unbiased, signed, high variance
      k2   r^2 / 2                   biased, >= 0; its gradient r * grad log pi_theta is, on
                                     samples of pi_theta, an unbiased estimate of grad KL
      k3   exp(d) - d - 1            unbiased, >= 0, low variance ("low_var_kl" in verl);
                                     clamped to [-clamp, clamp] (None = not clamped)
      abs  |r|                       biased, >= 0 (verl's "abs")
      k1+  value of k1, gradient of k2 (straight-through: k2 - sg(k2) + sg(k1))
      k3+  value of k3 (clamped as k3), gradient of k2

    k1, k2, k3 are Schulman's estimators ("Approximating KL Divergence", joschu.net/blog/
    kl-approx.html). abs and the "+" straight-through variants follow verl's
    verl/trainer/ppo/core_algos.py `kl_penalty` / `kl_penalty_forward` (the "+" suffix came
    with verl PR #2953; the k2-gradient argument is analysed in arXiv:2505.17508): k1 and k3
    estimate KL's value without bias but their gradients are not KL's gradient, k2's is, so
    the "+" kinds report the k1/k3 value and push the k2 gradient. The k3+ gradient flows
    even where the k3 value is clamped (as in verl).

    Departures from verl: names are k1/k2/k3 only (verl also accepts the aliases "kl", "mse",
    "low_var_kl"); only k1+ and k3+ carry the "+" (verl takes any "+" name, e.g. "abs+";
    "k2+" would be k2); verl's "full" is not offered. verl clamps d itself to [-20, 20] and
    always clamps k3 to [-10, 10]; here only the exponent's argument is capped at 20 (exp stays
    finite) and the output clamp is `clamp`, which is read by k3 and k3+ only.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    log_ratio = logprobs - ref_logprobs
    if kind.endswith("+"):
        value = kl_estimate(logprobs, ref_logprobs, kind[:-1], clamp).detach()
        k2 = 0.5 * log_ratio**2
        return k2 - k2.detach() + value  # forward: value exactly; backward: d k2 = log_ratio
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "abs":
        return log_ratio.abs()
    diff = -log_ratio  # k3
    kl = torch.exp(diff.clamp(max=20.0)) - diff - 1
    return kl.clamp(-clamp, clamp) if clamp is not None else kl


def kl_in_reward(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    loss_mask: Tensor,
    coef: float,
    kind: str = "k1",
    clamp: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """KL to the reference as a reward penalty instead of a loss term: r_t = -coef * k_t on
    every sampled token, plus the sequence reward on the last one (verl's use_kl_in_reward:
    ray_trainer `apply_kl_penalty` with core_algos `kl_penalty`; the KL-shaped reward of
    Ziegler et al., arXiv:1909.08593). Returns (sequence rewards [B] = R - coef * sum_t k_t for
    outcome estimators such as GRPO, token rewards [B, T] for REINFORCE++ and GAE, metrics).
    `logprobs` are the behaviour policy's (the rollout's): the penalty is a constant of the
    rollout and is returned detached. `kind` is any of `kl_estimate`'s; since a reward carries
    no gradient, k1+ gives exactly k1's penalty and k3+ exactly k3's.

    Departures from verl: `coef` is fixed here (verl can adapt it with its kl_ctrl); the same
    estimator caveats as `kl_estimate`, and `clamp` defaults to None (verl clamps k3 at 10).
    """
    valid = loss_mask > 0
    kl = kl_estimate(logprobs, ref_logprobs, kind, clamp).detach()
    kl = torch.where(valid, kl, torch.zeros_like(kl))
    penalty = coef * kl
    token_rewards = -penalty
    positions = torch.arange(valid.shape[1]).expand_as(valid)
    last = torch.where(valid, positions, -1).amax(dim=1)
    rows = torch.nonzero(last >= 0).squeeze(1)
    token_rewards[rows, last[rows]] += rewards[rows].float()
    metrics = {
        "reward/kl_penalty": float(penalty.sum(1).mean()),
        "kl/ref_in_reward": float(kl.sum() / valid.sum().clamp_min(1)),
    }
    return rewards.float() - penalty.sum(1), token_rewards, metrics


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
    """Plain entropy bonus: per-token loss -coef * H_t (the S term of PPO, arXiv 1707.06347 Eq. 9)."""
    entropy = _require(inputs, "entropy", "entropy_bonus")
    coef = params.coef if coef is None else coef
    return _finish(inputs, -coef * entropy, {"entropy/mean": masked_mean(entropy, inputs.loss_mask)})


@dataclass(frozen=True)
class KLParams:
    """Params of the `kl` regulariser: `kind` is a `kl_estimate` estimator (KL_KINDS), `clamp`
    its output clamp (k3 and k3+ only)."""

    coef: float = 1e-3
    kind: KLKind = "k3"
    clamp: float | None = 10.0
    target: float | None = None  # set to adapt coef towards this KL (controllers.AdaptiveKLController)
    horizon: int = 10000


@REGULARIZERS.register("kl", params=KLParams, needs={"ref_logprobs"}, controller="adaptive_kl")
def kl_penalty(inputs: LossInputs, params: KLParams, *, coef: float | None = None) -> LossOutput:
    """KL to the reference policy as a loss term: coef * k_t (verl's use_kl_loss with
    kl_loss_type, core_algos `kl_penalty`; the GRPO objective's KL term, arXiv:2402.03300, uses
    k3). `loss/kl_ref` is the estimator's value (for k1+/k3+ that of k1/k3).

    Departure from verl: `coef` can adapt towards `target` (verl adapts only the in-reward
    coefficient; its actor kl_loss_coef is fixed), and the estimator caveats of `kl_estimate`.
    """
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
    """AEnt clamped-entropy bonus, arXiv 2509.03493: per-token loss -c_k * H~_t.

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
    # "step": Href = mean of the previous RL steps' mean entropy (paper v2). "turn": the released
    # code's per-turn-index history, Href[s] = mean over all steps so far (this one included) of
    # the rollout's mean entropy at turn s, for a sample of turn s (needs rollout.mode=step).
    history: Literal["step", "turn"] = "step"
    # "loss_mode": the term is averaged like the policy loss, with algo.aggregation.mode (the
    # released code: token-mean over all turn-samples). "nested": the paper's Eq. 2, mean over the
    # tokens of each turn, then over the turns of each trajectory, then over trajectories (see `epo`).
    aggregation: Literal["loss_mode", "nested"] = "loss_mode"


@REGULARIZERS.register(
    "epo",
    params=EPOParams,
    needs=lambda p: (
        {"entropy"}
        | ({"turn_idx"} if p.history == "turn" else set())
        | ({"traj_ids"} if p.aggregation == "nested" else set())
    ),
    controller="epo",
)
def epo(
    inputs: LossInputs,
    params: EPOParams,
    *,
    entropy_ref: float | list[float] | None = None,
    beta: float = 1.0,
) -> LossOutput:
    """EPO entropy regulariser (arXiv 2509.22576): per-token loss -lambda (H - beta alpha P).

    P = [kappa_l Href - H]_+ + [H - kappa_r Href]_+ (hinge, differentiable) or, with
    penalty="indicator", the released code's constant 1[H <= kappa_l Href or H >= kappa_r Href].
    Href and beta_k come from `controllers.EPOController`: a float (history "step", the
    cumulative mean of past steps' mean entropy; None at step 0: no smoothing term) or, with
    history "turn", one value per turn index, looked up by each row's `turn_idx` (rows past
    the table's end use its last entry).

    aggregation="nested" (the paper's Eq. 2): (1/B) sum_j (1/T_j) sum_t (1/|tau_jt|) sum_i l_jti.
    A turn is a maximal run of sampled tokens of a row (a step-wise row is one turn; a
    trajectory-mode row holds its episode's turns, split by the env tokens between them); a
    trajectory is a `traj_ids` value (a step-wise episode's rows share it). Each token's loss is
    weighted by N / (B T_j |tau_jt|), N the sampled tokens, B the trajectories, T_j the turns of
    its trajectory, all counted over the rows of this call, so that the token-mean of the term
    (algo.aggregation.mode=token-mean, as the EPO preset) is that nested mean: exact when the
    mini-batch is one micro-batch on one rank; otherwise each micro-batch's nested mean, weighted
    by its share of the tokens (a trajectory whose turns fall in two micro-batches counts in
    each). The metrics stay token means (the controller's history reads entropy/mean).
    """
    entropy = _require(inputs, "entropy", "epo")
    penalty = torch.zeros_like(entropy)
    if entropy_ref is not None:
        if params.history == "turn":
            table = torch.tensor(entropy_ref, dtype=entropy.dtype, device=entropy.device)
            if inputs.turn_idx is None:
                raise ValueError("epo with history='turn' needs LossInputs.turn_idx (step-wise samples)")
            turns = inputs.turn_idx.clamp(0, len(table) - 1)
            entropy_ref = table[turns].unsqueeze(1)  # [B, 1] per row
        low, high = params.kappa_low * entropy_ref, params.kappa_high * entropy_ref
        if params.penalty == "hinge":
            penalty = torch.relu(low - entropy) + torch.relu(entropy - high)
        else:
            penalty = ((entropy <= low) | (entropy >= high)).to(entropy.dtype).detach()
    loss = -params.coef * (entropy - beta * params.alpha * penalty)
    if params.aggregation == "nested":
        if inputs.traj_ids is None:
            raise ValueError("epo with aggregation='nested' needs LossInputs.traj_ids")
        valid = inputs.valid
        B, T = valid.shape
        starts = valid & ~torch.nn.functional.pad(valid[:, :-1], (1, 0), value=False)
        rows = torch.arange(B, device=valid.device)[:, None].expand(B, T)
        _, turn = torch.unique((rows * T + starts.long().cumsum(1))[valid], return_inverse=True)
        _, traj = torch.unique(
            inputs.traj_ids.to(valid.device)[:, None].expand(B, T)[valid], return_inverse=True
        )
        tokens_per_turn = torch.bincount(turn).to(entropy.dtype)
        traj_of_turn = torch.zeros_like(tokens_per_turn, dtype=torch.long).scatter_(0, turn, traj)
        turns_per_traj = torch.bincount(traj_of_turn).to(entropy.dtype)
        weight = torch.zeros_like(entropy)
        weight[valid] = valid.sum() / (len(turns_per_traj) * turns_per_traj[traj] * tokens_per_turn[turn])
        loss = loss * weight
    metrics = {
        "entropy/mean": masked_mean(entropy, inputs.loss_mask),
        "loss/epo_penalty": masked_mean(penalty, inputs.loss_mask),
    }
    return _finish(inputs, loss, metrics)


def top_p_entropy_from_logits(
    logits: Tensor, top_p: float = 0.8, top_k: int = 10000, temperature: float = 1.0
) -> Tensor:
    """SIREN nucleus entropy H^p, arXiv 2509.25133: [..., V] -> [...].

    Among the top_k logits, keep the smallest prefix whose full-vocabulary probability mass
    reaches top_p (the token crossing p is kept), renormalise over it and take the entropy.
    The nucleus is chosen without gradient; the gradient flows through the kept logits.
    (Belongs with the kernels in trainer/logprobs.py; the learner computes it when a term
    needs "top_p_entropy".)
    """
    z = (logits.double() if logits.dtype == torch.float64 else logits.float()) / temperature
    top = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values  # sorted, descending
    probs = torch.exp(top - torch.logsumexp(z, dim=-1, keepdim=True)).detach()
    mass_before = probs.cumsum(-1) - probs
    keep = mass_before < top_p
    logp = torch.log_softmax(top.masked_fill(~keep, float("-inf")), dim=-1)
    return -(logp.exp() * torch.where(keep, logp, torch.zeros_like(logp))).sum(-1)


@dataclass(frozen=True)
class SIRENParams:
    coef: float = 0.005  # beta
    peak_quantile: float = 0.8  # keep tokens with H^p >= this quantile of their own response
    entropy_key: Literal["top_p_entropy", "entropy"] = "top_p_entropy"


@REGULARIZERS.register(
    "siren",
    params=SIRENParams,
    needs=lambda p: {p.entropy_key},
    controller="siren",
    aggregation="seq-mean-token-mean",
)
def siren(inputs: LossInputs, params: SIRENParams, *, entropy_anchor: float | None = None) -> LossOutput:
    """SIREN self-anchored selective entropy regulariser, arXiv 2509.25133.

    Peak mask: valid tokens whose H^p >= the `peak_quantile` quantile of H^p over their own
    response (linear interpolation). H_sel = seq-mean-token-mean of H^p over the peak tokens;
    the term is beta (H_sel - H_anchor)^2, H_anchor from `controllers.SIRENController` (the
    first step's H_sel; None = this batch's own value, so the term is 0 until anchored).
    A square of a batch mean is not a sum over tokens, so the per-token matrix is built for
    the "seq-mean-token-mean" aggregation (flag): l_t = 2 beta d (n_i / s_i) peak_t H_t +
    sg(beta d^2 - 2 beta d H_sel), d = sg(H_sel) - H_anchor, n_i / s_i valid / peak tokens of
    row i; aggregated that way it has value beta d^2 and gradient 2 beta d grad H_sel.
    """
    entropy = _require(inputs, params.entropy_key, "siren")
    valid = inputs.valid
    values = torch.where(valid, entropy.detach(), torch.full_like(entropy, float("nan")))
    has_valid = valid.any(dim=-1)
    cut = torch.zeros_like(values[:, 0])
    if has_valid.any():
        cut[has_valid] = torch.nanquantile(values[has_valid], params.peak_quantile, dim=-1)
    peak = valid & (entropy.detach() >= cut[:, None])
    n_valid, n_peak = valid.sum(-1), peak.sum(-1)
    rows = n_peak > 0
    row_mean = torch.where(peak, entropy, torch.zeros_like(entropy)).sum(-1) / n_peak.clamp_min(1)
    selected = row_mean[rows].sum() / rows.sum().clamp_min(1)
    d = 0.0 if entropy_anchor is None else selected.detach() - entropy_anchor
    scale = (n_valid / n_peak.clamp_min(1)).to(entropy.dtype)[:, None]
    linear = 2 * params.coef * d * scale * torch.where(peak, entropy, torch.zeros_like(entropy))
    loss = linear
    if entropy_anchor is not None:
        loss = loss + (params.coef * d * d - 2 * params.coef * d * selected).detach()
    metrics = {
        "entropy/siren_selected": selected.detach(),
        "entropy/siren_peak_frac": masked_mean(peak.float(), inputs.loss_mask),
    }
    return _finish(inputs, loss, metrics)


@dataclass(frozen=True)
class TemperatureReinforceParams:
    coef: float = 1.0  # alpha
    entropy_target: float = 0.5  # H_target (0.75 best in the README)
    temperature_high: float = 1.2
    temperature_low: float = 0.8
    max_samples: int = 60
    adv_threshold: float = 0.05


@REGULARIZERS.register(
    "temperature_reinforce",
    params=TemperatureReinforceParams,
    needs={"reinforce_mask", "entropy"},
    controller="temperature_switch",
)
def temperature_reinforce(inputs: LossInputs, params: TemperatureReinforceParams) -> LossOutput:
    """Arbitrary-Entropy PO's REINFORCE term, arXiv 2510.08141: l_t = -alpha m_t A_t log pi_t.

    Needs the rollout hook: each step, `controllers.TemperatureSwitchController.temperature`
    picks T_high or T_low from the previous step's entropy, extra samples are drawn at T,
    `sampling.select_reinforce_samples` keeps the positive ones with advantage +1, and their
    tokens are marked in `reinforce_mask` (and left out of the main loss's loss_mask). No
    importance correction between pi^T and pi, as in the reference.
    """
    mask = _require(inputs, "reinforce_mask", "temperature_reinforce")
    logprobs = torch.where(inputs.valid, inputs.logprobs, torch.zeros_like(inputs.logprobs))
    loss = -params.coef * mask * _advantages(inputs) * logprobs
    metrics = {"loss/reinforce_token_frac": masked_mean((mask > 0).float(), inputs.loss_mask)}
    if inputs.entropy is not None:  # the controller's switch reads the policy's mean entropy
        metrics["entropy/mean"] = masked_mean(inputs.entropy.detach(), inputs.loss_mask)
    return _finish(inputs, loss, metrics)
