"""Advantage estimators: one typed input, one typed output, selected by name from `ADVANTAGES`.

Every estimator takes `AdvantageInputs` (a batch of samples, one row per sample) and its own
params dataclass, and returns `AdvantageOutput` with `advantages[B, T]` that are exactly zero
wherever `loss_mask == 0` (env/tool/padding tokens never carry an advantage).

Samples, groups and trajectories: `group_ids` ties samples of the same task and initial state;
`traj_ids` ties the samples of one episode (several of them in step-wise mode, one per turn).
Each estimator's docstring cites its paper by arXiv id and says where it departs from the paper
or the reference code (verl, verl-agent).

This module knows nothing about models, configs or distribution: statistics are over the batch
it is given, so the caller passes whole groups (DESIGN: groups stay whole on one rank).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from trainer.registry import Registry

ADVANTAGES = Registry("advantage estimator")


@dataclass
class AdvantageInputs:
    """The batch view every estimator reads. Shapes: B samples, T tokens per sample.

    rewards:       [B] float, the sequence reward of each sample (in step-wise mode: the
                   episode return, repeated on every turn-sample of the episode).
    group_ids:     [B] long, samples of the same task/initial state share a group.
    traj_ids:      [B] long, samples of the same episode share a trajectory.
    loss_mask:     [B, T] {0,1}, 1 exactly on tokens the policy sampled.
    values:        [B, T] critic values (GAE).
    token_rewards: [B, T] per-token rewards (REINFORCE++, GAE); default: `rewards` placed on
                   the last sampled token of each row.
    entropies:     [B, T] per-token entropies (for entropy-aware estimators and metrics).
    turn_idx:      [B] long, which turn of its episode a step-wise sample is (GiGPO).
    step_rewards:  [B] float, this turn's share of the episode reward (GiGPO step returns): per-
                   turn rewards on the scale of `rewards`, whose sum over an episode's turns is
                   its reward (`trainer/loop.py` derives them from the configured reward).
    anchor_keys:   B hashables, the anchor state of each turn-sample, e.g. a hash of the raw
                   observation without history (GiGPO groups equal keys within a group).
    parent_ids:    [B] long, branched (tree) rollouts: the traj_id of the episode this row's
                   episode was branched from, -1 for a root (ARPO, arXiv 2507.19849; AEPO,
                   arXiv 2510.14545). Trajectory mode: one row per leaf trajectory. Step-wise
                   mode (`turn_idx` set): one row per turn the episode played itself.
    fork_positions:[B] long, tokens [0, fork) of the row are a verbatim copy of its parent's
                   tokens [0, fork) (the shared prefix, same column positions); ignored for roots.
                   Step-wise mode: read on a branch's fork-turn row only (a token-level fork's
                   first tokens, which are the parent's same-turn row's and have loss_mask 0).
    fork_turns:    [B] long, step-wise branches: the first turn the row's episode played itself
                   (its turns before it are its parent's samples); ignored for roots.
    """

    rewards: Tensor
    group_ids: Tensor
    traj_ids: Tensor
    loss_mask: Tensor
    values: Tensor | None = None
    token_rewards: Tensor | None = None
    entropies: Tensor | None = None
    turn_idx: Tensor | None = None
    step_rewards: Tensor | None = None
    anchor_keys: Sequence[Hashable] | None = None
    parent_ids: Tensor | None = None
    fork_positions: Tensor | None = None
    fork_turns: Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.loss_mask.shape[0]
        if self.loss_mask.dim() != 2:
            raise ValueError(f"loss_mask must be [B, T], got shape {tuple(self.loss_mask.shape)}")
        for name in (
            "rewards",
            "group_ids",
            "traj_ids",
            "turn_idx",
            "step_rewards",
            "parent_ids",
            "fork_positions",
            "fork_turns",
        ):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (batch,):
                raise ValueError(f"{name} must be [B]=[{batch}], got shape {tuple(value.shape)}")
        for name in ("values", "token_rewards", "entropies"):
            value = getattr(self, name)
            if value is not None and value.shape != self.loss_mask.shape:
                raise ValueError(
                    f"{name} must match loss_mask [B, T]={tuple(self.loss_mask.shape)}, "
                    f"got {tuple(value.shape)}"
                )
        if self.anchor_keys is not None and len(self.anchor_keys) != batch:
            raise ValueError(f"anchor_keys must have B={batch} entries, got {len(self.anchor_keys)}")


@dataclass
class AdvantageOutput:
    advantages: Tensor  # [B, T], zero where loss_mask == 0
    returns: Tensor | None = None  # [B, T] critic targets where an estimator defines them
    metrics: dict[str, float] = field(default_factory=dict)
    # [B, T] replacement loss mask (prefix de-duplication of tree rollouts): the learner must use
    # it instead of the input loss_mask when set. Advantages are already 0 where it drops tokens.
    loss_mask: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Group statistics


def _segment_stats(values: Tensor, segment: Tensor, num_segments: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-segment (count, mean, unbiased std) of 1-D `values`; std is nan for count < 2."""
    values = values.double()
    count = torch.zeros(num_segments, dtype=torch.float64, device=values.device)
    count.index_add_(0, segment, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, segment, values)
    mean = total / count.clamp_min(1)
    sq = torch.zeros_like(count).index_add_(0, segment, (values - mean[segment]) ** 2)
    std = (sq / (count - 1)).sqrt()  # inf/nan for count < 2; callers handle singletons
    return count, mean, std


def _group_baseline(
    rewards: Tensor, group_ids: Tensor, traj_ids: Tensor, count: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (n, mean, unbiased std) of the sample's group, as GRPO/RLOO need them.

    count="sample": every sample is one unit (verl-agent default: a long episode's many
    turn-samples weigh more). count="trajectory": each episode counts once, with the mean
    reward of its samples (equal to the episode return when its samples share it).
    """
    _, group_of_sample = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group_of_sample.max()) + 1 if group_ids.numel() else 0
    if count == "sample":
        n, mean, std = _segment_stats(rewards, group_of_sample, num_groups)
    elif count == "trajectory":
        _, traj_of_sample = torch.unique(traj_ids, return_inverse=True)
        num_trajs = int(traj_of_sample.max()) + 1
        _, traj_reward, _ = _segment_stats(rewards, traj_of_sample, num_trajs)
        group_of_traj = torch.zeros(num_trajs, dtype=torch.long, device=rewards.device)
        group_of_traj.scatter_(0, traj_of_sample, group_of_sample)
        if not torch.equal(group_of_traj[traj_of_sample], group_of_sample):
            raise ValueError("count='trajectory' needs every trajectory inside a single group")
        n, mean, std = _segment_stats(traj_reward, group_of_traj, num_groups)
    else:
        raise ValueError(f"count must be 'sample' or 'trajectory', got {count!r}")
    return n[group_of_sample], mean[group_of_sample], std[group_of_sample]


def _broadcast(per_sample: Tensor, loss_mask: Tensor) -> Tensor:
    """[B] -> [B, T] float32, zero where loss_mask == 0."""
    return per_sample.float()[:, None] * (loss_mask > 0).float()


def _masked_whiten(values: Tensor, loss_mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over valid tokens, unbiased var (verl masked_whiten)."""
    mask = loss_mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp_min(1)
    var = (((values - mean) ** 2) * mask).sum() / (n - 1).clamp_min(1)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def _adv_metrics(advantages: Tensor, loss_mask: Tensor) -> dict[str, float]:
    valid = advantages[loss_mask > 0]
    if valid.numel() == 0:
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/max": 0.0, "adv/min": 0.0}
    return {
        "adv/mean": valid.mean().item(),
        "adv/std": valid.std().item() if valid.numel() > 1 else 0.0,
        "adv/max": valid.max().item(),
        "adv/min": valid.min().item(),
    }


def _output(advantages: Tensor, loss_mask: Tensor, extra: dict[str, float] | None = None) -> AdvantageOutput:
    """Wrap [B, T] advantages with the standard `adv/*` metrics plus an estimator's own."""
    metrics = _adv_metrics(advantages, loss_mask)
    metrics.update(extra or {})
    return AdvantageOutput(advantages, None, metrics)


def _rewards_on_sampled_tokens(inputs: AdvantageInputs) -> Tensor:
    """[B, T] float32 token rewards, zero wherever loss_mask == 0.

    Without `token_rewards`, the sequence reward goes on the last sampled token of each row.
    Rewards given at masked positions are ignored (masking invariance): put an env reward on
    the last sampled token of the turn that earned it.
    """
    valid = inputs.loss_mask > 0
    if inputs.token_rewards is not None:
        return torch.where(
            valid, inputs.token_rewards.float(), torch.zeros_like(inputs.token_rewards.float())
        )
    B, T = valid.shape
    positions = torch.arange(T, device=valid.device).expand(B, T)
    last = torch.where(valid, positions, -1).amax(dim=1)
    out = torch.zeros(B, T, dtype=torch.float32, device=valid.device)
    rows = torch.nonzero(last >= 0).squeeze(1)
    out[rows, last[rows]] = inputs.rewards[rows].float()
    return out


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
# GAE (PPO with a critic)


@dataclass(frozen=True)
class GAEParams:
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True


@ADVANTAGES.register("gae", params=GAEParams, needs={"values"})
def gae(inputs: AdvantageInputs, params: GAEParams) -> AdvantageOutput:
    """GAE, arXiv 1506.02438 §3, over the sampled tokens of each row (env/tool tokens skipped).

    delta_t = r_t + gamma V_{t'} - V_t with t' the next sampled token (V = 0 after the last);
    A_t = delta_t + gamma lam A_{t'}. returns = A + V (critic targets, before whitening);
    then A is whitened over the batch's valid tokens if `whiten`.
    """
    if inputs.values is None:
        raise ValueError("gae needs AdvantageInputs.values (critic values [B, T])")
    rewards = _rewards_on_sampled_tokens(inputs)
    values = inputs.values.float()
    valid = inputs.loss_mask > 0
    raw = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + params.gamma * next_value - values[:, t]
        adv_t = delta + params.gamma * params.lam * next_adv
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        raw[:, t] = torch.where(valid[:, t], adv_t, torch.zeros_like(adv_t))
    returns = torch.where(valid, raw + values, torch.zeros_like(raw))
    advantages = _masked_whiten(raw, inputs.loss_mask) if params.whiten else raw
    return AdvantageOutput(advantages, returns, _adv_metrics(advantages, inputs.loss_mask))


# --------------------------------------------------------------------------------------------
# GiGPO (step-wise samples with anchor states)


@dataclass(frozen=True)
class GiGPOParams:
    step_weight: float = 1.0  # omega
    gamma: float = 0.95  # discount of the step returns
    mode: Literal["mean_norm", "mean_std_norm"] = "mean_norm"
    eps: float = 1e-6
    count: Literal["sample", "trajectory"] = "sample"  # episode-level unit, as in grpo


def _step_returns(inputs: AdvantageInputs, gamma: float) -> Tensor:
    """R_{i,t} = sum_{k >= t} gamma^(k - t) r_{i,k} along each episode's turns (by turn_idx)."""
    turns = inputs.turn_idx.tolist()
    rewards = inputs.step_rewards.double().tolist()
    by_traj: dict[int, list[int]] = defaultdict(list)
    for i, traj in enumerate(inputs.traj_ids.tolist()):
        by_traj[traj].append(i)
    returns = [0.0] * len(turns)
    for traj, rows in by_traj.items():
        rows.sort(key=lambda i: turns[i])
        if len({turns[i] for i in rows}) != len(rows):
            raise ValueError(f"trajectory {traj} has two samples with the same turn_idx")
        running = 0.0
        for i in reversed(rows):
            running = rewards[i] + gamma * running
            returns[i] = running
    return torch.tensor(returns, dtype=torch.float64, device=inputs.rewards.device)


@ADVANTAGES.register("gigpo", params=GiGPOParams, needs={"turn_idx", "step_rewards", "anchor_keys"})
def gigpo(inputs: AdvantageInputs, params: GiGPOParams) -> AdvantageOutput:
    """GiGPO (arXiv 2505.10978): A = A^E + omega A^S, one sample per turn (step-wise mode).

    A^E: GRPO-style over the group with F = 1 (mean_norm) or F = std + eps (mean_std_norm);
    `rewards` must hold the episode return on every turn-sample. A^S: samples of the same group
    whose `anchor_keys` are equal (same raw observation) form an anchor group;
    A^S = (R_{i,t} - anchor mean) / F with R_{i,t} the discounted return of `step_rewards` from
    this turn on. Singleton anchor groups get A^S = 0.

    Both levels must use the same reward: `step_rewards` are per-turn shares of `rewards` (an
    episode's sum to its reward), not raw env rewards on another scale. `trainer/loop.py` makes
    them from the configured reward: the env's step reward times the weight of the `score`
    reward term on every turn, the rest of the episode reward on the last turn. With a reward
    of `success` only, R_{i,t} = gamma^(last - t) R_i, as in verl-agent (whose env pays the
    episode reward at the last step).
    """
    missing = [n for n in ("turn_idx", "step_rewards", "anchor_keys") if getattr(inputs, n) is None]
    if missing:
        raise ValueError(f"gigpo needs AdvantageInputs fields {missing} (step-wise samples)")
    norm = params.mode == "mean_std_norm"
    episode = grpo(inputs, GRPOParams(norm_by_std=norm, eps=params.eps, count=params.count))
    step_return = _step_returns(inputs, params.gamma)
    anchor_of: dict[tuple, int] = {}
    keys = [
        anchor_of.setdefault((g, k), len(anchor_of))
        for g, k in zip(inputs.group_ids.tolist(), inputs.anchor_keys, strict=True)
    ]
    anchor = torch.tensor(keys, dtype=torch.long, device=step_return.device)
    n, mean, std = _segment_stats(step_return, anchor, len(anchor_of))
    n, mean, std = n[anchor], mean[anchor], std[anchor]
    denom = std + params.eps if norm else torch.ones_like(std)
    step_adv = torch.where(
        n < 2, torch.zeros_like(mean), (step_return - mean) / torch.where(n < 2, 1.0, denom)
    )
    advantages = episode.advantages + params.step_weight * _broadcast(step_adv.float(), inputs.loss_mask)
    metrics = _adv_metrics(advantages, inputs.loss_mask)
    metrics["adv/episode_mean"] = episode.metrics["adv/mean"]
    metrics["adv/step_abs_mean"] = step_adv.abs().mean().item() if step_adv.numel() else 0.0
    metrics["adv/anchor_grouped_frac"] = (n >= 2).double().mean().item() if n.numel() else 0.0
    return AdvantageOutput(advantages, None, metrics)


# --------------------------------------------------------------------------------------------
# Tree (branched) rollouts: ARPO/AEPO soft and hard attribution


@dataclass(frozen=True)
class TreeParams:
    attribution: Literal["soft", "hard"] = "soft"
    dedup_prefix: bool = False  # train each shared prefix token once (needs attribution="hard")
    norm_by_std: bool = True
    eps: float = 1e-6


def _prefix_owner(inputs: AdvantageInputs) -> Tensor:
    """owner[i, t] = the row whose token t row i's token t is a copy of (the tree node's first row).

    owner[i, t] = owner[parent(i), t] for t < fork(i), else i. Rows are leaves (one per
    trajectory); parents must be in the same group; cycles and unknown parents are rejected.
    """
    B, T = inputs.loss_mask.shape
    owner = torch.arange(B).repeat_interleave(T).view(B, T)
    if inputs.parent_ids is None:
        return owner.to(inputs.loss_mask.device)
    traj = inputs.traj_ids.tolist()
    if len(set(traj)) != B:
        raise ValueError("tree advantages need one row per trajectory (traj_ids unique)")
    row_of = {t: i for i, t in enumerate(traj)}
    if inputs.fork_positions is None:
        raise ValueError("grpo_tree: parent_ids need fork_positions (where each branch leaves its parent)")
    parents, forks = inputs.parent_ids.tolist(), inputs.fork_positions.tolist()
    groups = inputs.group_ids.tolist()
    done = [False] * B

    def resolve(i: int, seen: tuple[int, ...]) -> None:
        if done[i]:
            return
        if parents[i] >= 0:
            if parents[i] not in row_of:
                raise ValueError(f"parent_ids[{i}]={parents[i]} is not a traj_id of this batch")
            p = row_of[parents[i]]
            if p in seen or p == i:
                raise ValueError(f"parent_ids form a cycle through trajectory {traj[i]}")
            if groups[p] != groups[i]:
                raise ValueError(f"trajectory {traj[i]} branches from {traj[p]} of another group")
            if not 0 <= forks[i] <= T:
                raise ValueError(f"fork_positions[{i}]={forks[i]} outside [0, T={T}]")
            resolve(p, seen + (i,))
            owner[i, : forks[i]] = owner[p, : forks[i]]
        done[i] = True

    for i in range(B):
        resolve(i, ())
    return owner.to(inputs.loss_mask.device)


@ADVANTAGES.register("grpo_tree", params=TreeParams, needs={"parent_ids", "fork_positions"})
def grpo_tree(inputs: AdvantageInputs, params: TreeParams) -> AdvantageOutput:
    """GRPO on branched rollouts (ARPO tree sampling, arXiv 2507.19849; AEPO, arXiv 2510.14545).

    Every leaf trajectory gets the GRPO advantage A_L over its group (units = leaves).
    Trajectory mode (one row per leaf, shared prefixes copied into every row): soft (ARPO
    default): each row keeps A_L on all its tokens; a prefix shared by k leaves is trained k
    times with their own advantages. hard: a shared prefix token gets the mean advantage of the
    leaves that contain it. dedup_prefix (hard only): each shared token is trained once, on the
    row that owns it (the root-most copy); `loss_mask` in the output drops the copies (the
    learner must use it). Without parent_ids this is plain GRPO.

    Step-wise mode (`turn_idx` set): see `_step_tree_credit`; every turn-sample gets the credit
    of all the leaves (episodes) that played it, not only of the episode that emitted it.
    """
    if params.dedup_prefix and params.attribution != "hard":
        raise ValueError("grpo_tree: dedup_prefix needs attribution='hard' (soft has no single value)")
    if inputs.turn_idx is not None:
        return _step_tree_credit(inputs, params)
    per_sample, group_metrics = _grpo_per_sample(
        inputs, GRPOParams(norm_by_std=params.norm_by_std, eps=params.eps, count="sample")
    )
    valid = inputs.loss_mask > 0
    owner = _prefix_owner(inputs)
    B, T = valid.shape
    node = owner * T + torch.arange(T, device=owner.device)
    leaf_adv = per_sample[:, None].expand(B, T)
    if params.attribution == "hard":
        total = torch.zeros(B * T, dtype=torch.float64, device=owner.device)
        count = torch.zeros_like(total)
        total.index_add_(0, node[valid], leaf_adv[valid])
        count.index_add_(0, node[valid], torch.ones_like(leaf_adv[valid]))
        token_adv = (total / count.clamp_min(1))[node]
    else:
        token_adv = leaf_adv
    loss_mask = None
    if params.dedup_prefix:
        own = owner == torch.arange(B, device=owner.device)[:, None]
        loss_mask = (inputs.loss_mask * own).to(inputs.loss_mask.dtype)
        valid = loss_mask > 0
    advantages = torch.where(valid, token_adv.float(), torch.zeros(B, T, device=owner.device))
    metrics = _adv_metrics(advantages, inputs.loss_mask if loss_mask is None else loss_mask)
    metrics.update(group_metrics)
    shared = (owner != torch.arange(B, device=owner.device)[:, None]) & (inputs.loss_mask > 0)
    metrics["adv/shared_prefix_frac"] = shared.double().sum().item() / max(
        int((inputs.loss_mask > 0).sum()), 1
    )
    return AdvantageOutput(advantages, None, metrics, loss_mask)


@dataclass
class _StepEpisode:
    """One episode of step-wise rows: its tree links and the rows it emitted, by turn."""

    parent: int  # traj_id, -1 for a root
    fork: int  # first turn it played itself (0 for a root)
    group: int
    rows: dict[int, int] = field(default_factory=dict)  # turn -> row
    offset: int = 0  # its fork turn's first tokens that are the parent's (token-level fork)


def _step_episodes(inputs: AdvantageInputs) -> dict[int, _StepEpisode]:
    """Step-wise rows grouped into episodes, with the tree checked: parents in the batch and in
    the same group, no cycles, no row before its episode's fork turn, no sampled token in a
    fork row's shared prefix."""
    B, T = inputs.loss_mask.shape
    traj, turns, groups = inputs.traj_ids.tolist(), inputs.turn_idx.tolist(), inputs.group_ids.tolist()
    parents = inputs.parent_ids.tolist() if inputs.parent_ids is not None else [-1] * B
    forks = inputs.fork_turns.tolist() if inputs.fork_turns is not None else [0] * B
    offsets = inputs.fork_positions.tolist() if inputs.fork_positions is not None else [0] * B
    episodes: dict[int, _StepEpisode] = {}
    for i in range(B):
        root = parents[i] < 0
        ep = episodes.setdefault(traj[i], _StepEpisode(parents[i], 0 if root else forks[i], groups[i]))
        if (ep.parent, ep.group) != (parents[i], groups[i]) or (not root and ep.fork != forks[i]):
            raise ValueError(
                f"the samples of trajectory {traj[i]} disagree on its parent, fork turn or group"
            )
        if turns[i] in ep.rows:
            raise ValueError(f"trajectory {traj[i]} has two samples with the same turn_idx")
        if turns[i] < ep.fork:
            raise ValueError(
                f"trajectory {traj[i]} has a sample of turn {turns[i]}, before its fork turn {ep.fork}: "
                "a branch's shared turns are its parent's samples"
            )
        ep.rows[turns[i]] = i
        if not root and turns[i] == ep.fork:
            if not 0 <= offsets[i] <= T:
                raise ValueError(f"fork_positions[{i}]={offsets[i]} outside [0, T={T}]")
            if bool((inputs.loss_mask[i, : offsets[i]] > 0).any()):
                raise ValueError(
                    f"trajectory {traj[i]}'s fork-turn sample has sampled tokens in its shared prefix "
                    f"[0, {offsets[i]}): those are its parent's (loss_mask must be 0 there)"
                )
            ep.offset = offsets[i]
    for t, ep in episodes.items():
        seen, node = {t}, ep
        while node.parent >= 0:
            if node.parent not in episodes:
                raise ValueError(f"parent_ids: trajectory {node.parent} is not a traj_id of this batch")
            if episodes[node.parent].group != ep.group:
                raise ValueError(f"trajectory {t} branches from {node.parent} of another group")
            if node.parent in seen:
                raise ValueError(f"parent_ids form a cycle through trajectory {t}")
            seen.add(node.parent)
            node = episodes[node.parent]
    return episodes


def _step_tree_credit(inputs: AdvantageInputs, params: TreeParams) -> AdvantageOutput:
    """grpo_tree over step-wise rows (one row per turn an episode played itself).

    A branch emits only its own turns: its turns before `fork_turns` are its parent's rows
    (and, after a token-level fork, the first `fork_positions` tokens of its fork turn are its
    parent's same-turn row's). So a token of a row is contained in every leaf (episode) whose
    path runs through it: its own episode and each descendant that forked after it. Leaves are
    the group's units: A_L = GRPO over the episodes of the group (count="trajectory"; without
    branches this is GRPO with each episode counted once). A sampled token then gets, with
    soft, the sum of A_L over the leaves containing it (trajectory mode trains a shared token
    once per leaf, its copies, with each leaf's advantage; here it exists once, so its gradient
    sums the same terms) and, with hard, their mean (as trajectory mode with dedup_prefix).
    Either way a shared turn is credited by all its descendants, not by the episode that
    emitted it alone. dedup_prefix changes nothing: shared turns are single rows already.
    """
    episodes = _step_episodes(inputs)
    per_sample, group_metrics = _grpo_per_sample(
        inputs, GRPOParams(norm_by_std=params.norm_by_std, eps=params.eps, count="trajectory")
    )
    B, T = inputs.loss_mask.shape
    total = torch.zeros(B, T, dtype=torch.float64)
    count = torch.zeros(B, T, dtype=torch.float64)

    def credit(traj: int, turn: int, hi: int, value: float) -> None:
        """Tokens [0, hi) of `turn` as episode `traj` played it: each goes to the row that
        sampled it, up the parent chain (turns before a fork, a token-level fork's prefix)."""
        while hi > 0:
            ep = episodes[traj]
            lo_own = 0  # tokens [lo_own, hi) are this episode's own
            if ep.parent >= 0 and turn <= ep.fork:
                lo_own = ep.offset if turn == ep.fork else hi
            if lo_own < hi:
                if turn not in ep.rows:
                    raise ValueError(
                        f"trajectory {traj} has no sample of turn {turn}, which a branch of it shares"
                    )
                row = ep.rows[turn]
                total[row, lo_own:hi] += value
                count[row, lo_own:hi] += 1
            hi = min(hi, lo_own)
            traj = ep.parent

    for traj, ep in episodes.items():
        rows = list(ep.rows.values())
        value = float(per_sample[rows].mean())  # the leaf's advantage (its rows share it)
        for turn in sorted(set(range(ep.fork)) | set(ep.rows)):
            credit(traj, turn, T, value)
    token_adv = total if params.attribution == "soft" else total / count.clamp_min(1)
    valid = inputs.loss_mask > 0
    device = inputs.loss_mask.device
    advantages = torch.where(valid, token_adv.float().to(device), torch.zeros(B, T, device=device))
    metrics = _adv_metrics(advantages, inputs.loss_mask)
    metrics.update(group_metrics)
    shared = (count.to(device) > 1) & valid
    metrics["adv/shared_turn_frac"] = shared.double().sum().item() / max(int(valid.sum()), 1)
    return AdvantageOutput(advantages, None, metrics)


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
