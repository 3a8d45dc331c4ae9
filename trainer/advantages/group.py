"""Group-relative outcome estimators: each sample's sequence reward, compared within its group.

GRPO (arXiv 2402.03300) and Dr.GRPO (arXiv 2503.20783), RLOO (arXiv 2402.14740), REINFORCE++
and REINFORCE++-baseline (arXiv 2501.03262), the entropy-aware reshapings of the GRPO
advantage, AEPO (arXiv 2510.14545), EMPG (arXiv 2509.09265) and ETTRL EAR (arXiv 2508.11356),
and HAPO's token-weighted group average (arXiv 2509.16591). They belong together because they
start from the same group baseline (`_group_baseline`, `_grpo_per_sample`; HAPO falls back to
it) and differ in how they scale or reshape it; REINFORCE++ without baseline stays beside its
baseline variant, with which it shares the paper and the global whitening. `_grpo_per_sample`
and `grpo` are also the leaf and episode advantages of the tree and GiGPO estimators
(`credit.py`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trainer.advantages.base import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageOutput,
    _adv_metrics,
    _broadcast,
    _group_baseline,
    _masked_whiten,
    _output,
    _rewards_on_sampled_tokens,
)

# --------------------------------------------------------------------------------------------
# GRPO / Dr.GRPO / RLOO


@dataclass(frozen=True)
class GRPOParams:
    norm_by_std: bool = True  # False = Dr.GRPO (arXiv 2503.20783)
    eps: float = 1e-6
    count: Literal["sample", "trajectory"] = "sample"


def _grpo_per_sample(inputs: AdvantageInputs, params: GRPOParams) -> tuple[Tensor, dict[str, float]]:
    """Per-sample GRPO advantage [B] (float64) and the group metrics; see `grpo`."""
    n, mean, std = _group_baseline(inputs.rewards, inputs.group_ids, inputs.traj_ids, params.count)
    single = n < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    if params.norm_by_std:
        denom = torch.where(single, torch.ones_like(std), std + params.eps)
    else:
        denom = torch.ones_like(std)
    per_sample = (inputs.rewards.double() - mean) / denom
    metrics = {
        "adv/singleton_frac": single.double().mean().item() if single.numel() else 0.0,
        "adv/zero_std_frac": ((std == 0) & ~single).double().mean().item() if std.numel() else 0.0,
    }
    return per_sample, metrics


@ADVANTAGES.register("grpo", params=GRPOParams)
def grpo(inputs: AdvantageInputs, params: GRPOParams) -> AdvantageOutput:
    """GRPO outcome advantage, arXiv 2402.03300 §4.1.2 (Dr.GRPO, arXiv 2503.20783, with `norm_by_std=False`).

    A_i = (R_i - mean_g) / (std_g + eps), unbiased std over the group, broadcast to the sampled
    tokens of sample i. A group of one unit has mean 0 and std 1, so A_i = R_i exactly (verl
    gives R_i / (1 + eps)). `count` decides what a unit of the group is, see `_group_baseline`.
    """
    per_sample, group_metrics = _grpo_per_sample(inputs, params)
    return _output(_broadcast(per_sample.float(), inputs.loss_mask), inputs.loss_mask, group_metrics)


@dataclass(frozen=True)
class RLOOParams:
    count: Literal["sample", "trajectory"] = "sample"


@ADVANTAGES.register("rloo", params=RLOOParams, min_group_size=2)
def rloo(inputs: AdvantageInputs, params: RLOOParams) -> AdvantageOutput:
    """RLOO (arXiv 2402.14740): A_i = R_i - mean of the other n-1 units = n/(n-1) (R_i - mean_g).

    Group of one: A = 0. A lone unit has no "others" to be compared with, so it carries no
    learning signal (reported as `adv/singleton_frac`). verl's rloo gives it its raw score R_i
    instead, an unbaselined REINFORCE term on another scale than the rest of the batch; we do
    not. A group of several step-wise turn-samples of one episode (count="sample") is no
    better: they share the episode's reward, so each is 0 too. Hence the registry flag
    `min_group_size=2`: `trainer/config.finalize` rejects `algo.group_size=1` with this
    estimator instead of letting it train on zeros.
    """
    n, mean, _ = _group_baseline(inputs.rewards, inputs.group_ids, inputs.traj_ids, params.count)
    single = n < 2
    scale = torch.where(single, torch.zeros_like(n), n / (n - 1).clamp_min(1))
    per_sample = scale * (inputs.rewards.double() - mean)
    advantages = _broadcast(per_sample.float(), inputs.loss_mask)
    metrics = _adv_metrics(advantages, inputs.loss_mask)
    metrics["adv/singleton_frac"] = single.double().mean().item() if single.numel() else 0.0
    return AdvantageOutput(advantages, None, metrics)


# --------------------------------------------------------------------------------------------
# REINFORCE++ and REINFORCE++-baseline


@dataclass(frozen=True)
class ReinforcePPParams:
    gamma: float = 1.0


@ADVANTAGES.register("reinforce_plus_plus", params=ReinforcePPParams)
def reinforce_plus_plus(inputs: AdvantageInputs, params: ReinforcePPParams) -> AdvantageOutput:
    """REINFORCE++, arXiv 2501.03262: discounted token returns, then global whitening.

    G_t = r_t + gamma G_{next sampled token} along each row (masked env/tool tokens are skipped
    and their rewards ignored). A = whiten(G) over all valid
    tokens of the batch (unbiased variance). `returns` = G. A per-token KL penalty goes into
    `token_rewards` beforehand if wanted (kl-in-reward).
    """
    rewards = _rewards_on_sampled_tokens(inputs)
    valid = inputs.loss_mask > 0
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(valid[:, t], rewards[:, t] + params.gamma * running, running)
        returns[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    advantages = _masked_whiten(returns, inputs.loss_mask)
    return AdvantageOutput(advantages, returns, _adv_metrics(advantages, inputs.loss_mask))


@ADVANTAGES.register("reinforce_plus_plus_baseline", params=RLOOParams)
def reinforce_plus_plus_baseline(inputs: AdvantageInputs, params: RLOOParams) -> AdvantageOutput:
    """REINFORCE++-baseline, arXiv 2501.03262: A_i = R_i - mean_g, broadcast, global whitening.

    Whitening is over all valid tokens of the batch (token-weighted, unbiased variance).
    A group of one has mean 0 (as GRPO), so its sample keeps R before whitening.
    """
    n, mean, _ = _group_baseline(inputs.rewards, inputs.group_ids, inputs.traj_ids, params.count)
    mean = torch.where(n < 2, torch.zeros_like(mean), mean)
    centred = _broadcast((inputs.rewards.double() - mean).float(), inputs.loss_mask)
    advantages = _masked_whiten(centred, inputs.loss_mask)
    return AdvantageOutput(advantages, None, _adv_metrics(advantages, inputs.loss_mask))


# --------------------------------------------------------------------------------------------
# Entropy-aware reshaping of the GRPO advantage: AEPO (arXiv 2510.14545), EMPG (arXiv 2509.09265),
# ETTRL EAR (arXiv 2508.11356)


def _row_entropy(inputs: AdvantageInputs, who: str) -> tuple[Tensor, Tensor]:
    """(mean entropy of each row's sampled tokens [B] float64, row has a sampled token [B])."""
    if inputs.entropies is None:
        raise ValueError(f"{who} needs AdvantageInputs.entropies ([B, T] per-token entropy)")
    valid = inputs.loss_mask > 0
    total = torch.where(valid, inputs.entropies.double(), torch.zeros_like(inputs.entropies.double())).sum(-1)
    return total / valid.sum(-1).clamp_min(1), valid.any(-1)


@dataclass(frozen=True)
class AEPOAdvParams:
    entropy_coef: float = 0.2  # a in A (1 + a z_H)
    norm_by_std: bool = True
    eps: float = 1e-6
    count: Literal["sample", "trajectory"] = "sample"


@ADVANTAGES.register("aepo", params=AEPOAdvParams, needs={"entropies"})
def aepo_advantage(inputs: AdvantageInputs, params: AEPOAdvParams) -> AdvantageOutput:
    """AEPO entropy-aware advantage, arXiv 2510.14545: A_t = A_GRPO (1 + a z_t).

    z = z-score of the rollout-time token entropy over this batch's valid tokens (unbiased
    std; std 0 -> 1). The loss "aepo" applies the same reshaping with the current entropy:
    use one of the two (loss param entropy_adv_coef=0 with this estimator).
    """
    if inputs.entropies is None:
        raise ValueError("aepo needs AdvantageInputs.entropies ([B, T] per-token entropy)")
    per_sample, group_metrics = _grpo_per_sample(
        inputs, GRPOParams(norm_by_std=params.norm_by_std, eps=params.eps, count=params.count)
    )
    valid = inputs.loss_mask > 0
    entropy = inputs.entropies.double()[valid]
    z = torch.zeros_like(inputs.entropies, dtype=torch.float64)
    if entropy.numel():
        std = entropy.std() if entropy.numel() > 1 else entropy.new_zeros(())
        z[valid] = (entropy - entropy.mean()) / (std if std > 0 else 1.0)
    advantages = _broadcast(per_sample.float(), inputs.loss_mask) * (1 + params.entropy_coef * z).float()
    return _output(advantages, inputs.loss_mask, group_metrics)


@dataclass(frozen=True)
class EMPGParams:
    k: float = 1.0  # confidence scaling of the step's own entropy
    k_next: float = 1.0  # k' of the future-clarity bonus
    zeta: float = 0.05  # weight of the future-clarity bonus
    eps: float = 1e-8  # min-max normalisation
    norm_by_std: bool = True  # base GRPO trajectory advantage
    count: Literal["sample", "trajectory"] = "sample"


def _next_turn_row(inputs: AdvantageInputs) -> list[int]:
    """Row of the same trajectory's next turn (by turn_idx), -1 for the last turn / no turn_idx."""
    B = inputs.rewards.shape[0]
    if inputs.turn_idx is None:
        return [-1] * B
    by_traj: dict[int, list[int]] = defaultdict(list)
    for i, traj in enumerate(inputs.traj_ids.tolist()):
        by_traj[traj].append(i)
    turns = inputs.turn_idx.tolist()
    nxt = [-1] * B
    for traj, rows in by_traj.items():
        rows.sort(key=lambda i: turns[i])
        if len({turns[i] for i in rows}) != len(rows):
            raise ValueError(f"trajectory {traj} has two samples with the same turn_idx")
        for a, b in zip(rows[:-1], rows[1:], strict=True):
            nxt[a] = b
    return nxt


@ADVANTAGES.register("empg", params=EMPGParams, needs={"entropies"})
def empg(inputs: AdvantageInputs, params: EMPGParams) -> AdvantageOutput:
    """EMPG entropy-modulated step advantages, arXiv 2509.09265 (one sample per turn).

    H_{i,t} = mean token entropy of the turn-sample; H~ = (H - min) / (max - min + eps) over
    the batch's samples; g = exp(-k H~) / mean(exp(-k H~)); f = exp(-k' H~ of the next turn of
    the same trajectory) (0 on the last turn; without turn_idx every sample is a last turn);
    A_mod = g A_GRPO + zeta f, then the batch mean of A_mod is subtracted. Samples without a
    sampled token are left out of every statistic and get 0.
    """
    per_sample, group_metrics = _grpo_per_sample(
        inputs, GRPOParams(norm_by_std=params.norm_by_std, count=params.count)
    )
    entropy, has = _row_entropy(inputs, "empg")
    normed = torch.zeros_like(entropy)
    if has.any():
        low, high = entropy[has].min(), entropy[has].max()
        normed = (entropy - low) / (high - low + params.eps)
    scale = torch.exp(-params.k * normed)
    scale = scale / scale[has].mean() if has.any() else scale
    nxt = torch.tensor(_next_turn_row(inputs), device=entropy.device)
    has_next = (nxt >= 0) & has[nxt.clamp_min(0)]
    bonus = torch.where(
        has_next, torch.exp(-params.k_next * normed[nxt.clamp_min(0)]), torch.zeros_like(normed)
    )
    modulated = scale * per_sample + params.zeta * bonus
    modulated = modulated - (modulated[has].mean() if has.any() else 0.0)
    advantages = _broadcast(
        torch.where(has, modulated, torch.zeros_like(modulated)).float(), inputs.loss_mask
    )
    metrics = _adv_metrics(advantages, inputs.loss_mask)
    metrics.update(group_metrics)
    metrics["adv/empg_scale_max"] = scale[has].max().item() if has.any() else 0.0
    return AdvantageOutput(advantages, None, metrics)


@dataclass(frozen=True)
class ETTRLParams:
    mode: Literal["reshape", "clip"] = "reshape"  # Adv-Res (default) | Adv-Clip
    clip: float = 2.0  # beta of Adv-Clip
    norm_by_std: bool = True
    eps: float = 1e-6
    count: Literal["sample", "trajectory"] = "sample"


@ADVANTAGES.register(
    "ettrl", params=ETTRLParams, needs=lambda p: {"entropies"} if p.mode == "reshape" else set()
)
def ettrl(inputs: AdvantageInputs, params: ETTRLParams) -> AdvantageOutput:
    """ETTRL entropy-based advantage reshaping (EAR), arXiv 2508.11356.

    reshape: A'_i = Y_i A_i, Y_i = 1 + (mean_g Hbar - Hbar_i) / mean_g Hbar with Hbar_i the
    sample's mean token entropy and mean_g over its group's samples that have a sampled token
    (Y = 1 when the group mean is 0). clip: A'_i = clip(A_i, -beta, beta).
    """
    per_sample, group_metrics = _grpo_per_sample(
        inputs, GRPOParams(norm_by_std=params.norm_by_std, eps=params.eps, count=params.count)
    )
    if params.mode == "clip":
        reshaped = per_sample.clamp(-params.clip, params.clip)
    else:
        entropy, has = _row_entropy(inputs, "ettrl")
        _, group = torch.unique(inputs.group_ids, return_inverse=True)
        num_groups = int(group.max()) + 1 if group.numel() else 0
        total = torch.zeros(num_groups, dtype=torch.float64).index_add_(
            0, group, torch.where(has, entropy, 0.0)
        )
        count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, has.double())
        group_mean = (total / count.clamp_min(1))[group]
        scale = torch.where(group_mean > 0, 1 + (group_mean - entropy) / group_mean.clamp_min(1e-12), 1.0)
        reshaped = scale * per_sample
    return _output(_broadcast(reshaped.float(), inputs.loss_mask), inputs.loss_mask, group_metrics)


# --------------------------------------------------------------------------------------------
# HAPO token-level group average advantage


@dataclass(frozen=True)
class HAPOAdvParams:
    eps: float = 1e-6
    fallback_threshold: float = 5.0  # a group with any |A| >= this falls back to GRPO


@ADVANTAGES.register("hapo", params=HAPOAdvParams)
def hapo_advantage(inputs: AdvantageInputs, params: HAPOAdvParams) -> AdvantageOutput:
    """HAPO token-level group average advantage, arXiv 2509.16591.

    Per group, samples weigh by their sampled-token count |o_i|: mu = sum |o_i| R_i / sum |o_i|,
    sigma = sqrt(sum |o_i| (R_i - mu)^2 / sum |o_i|) (biased), A_i = (R_i - mu) / (sigma + eps).
    Groups with any |A_i| >= fallback_threshold, and groups of one sample, use GRPO instead
    (so a lone sample gets A = R, as in "grpo").
    """
    rewards = inputs.rewards.double()
    length = (inputs.loss_mask > 0).sum(-1).double()
    _, group = torch.unique(inputs.group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=rewards.device)
    weight = zeros.clone().index_add_(0, group, length)
    mean = (zeros.clone().index_add_(0, group, length * rewards) / weight.clamp_min(1e-12))[group]
    var = zeros.clone().index_add_(0, group, length * (rewards - mean) ** 2) / weight.clamp_min(1e-12)
    token_adv = (rewards - mean) / (var.sqrt()[group] + params.eps)
    size = zeros.clone().index_add_(0, group, torch.ones_like(rewards))
    too_big = zeros.clone().index_add_(0, group, (token_adv.abs() >= params.fallback_threshold).double())
    fallback = ((too_big > 0) | (size < 2))[group]
    grpo_adv, group_metrics = _grpo_per_sample(inputs, GRPOParams())
    per_sample = torch.where(fallback, grpo_adv, token_adv)
    advantages = _broadcast(per_sample.float(), inputs.loss_mask)
    metrics = _adv_metrics(advantages, inputs.loss_mask)
    metrics.update(group_metrics)
    metrics["adv/hapo_fallback_frac"] = fallback.double().mean().item() if fallback.numel() else 0.0
    return AdvantageOutput(advantages, None, metrics)
