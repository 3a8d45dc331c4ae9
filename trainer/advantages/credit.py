"""Multi-turn and tree credit: estimators that read the episode structure, not only one
reward per sample.

GiGPO (arXiv 2505.10978): an episode-level GRPO advantage plus a step-level one over the
turn-samples of a group that share an anchor state, from discounted step returns. grpo_tree:
GRPO over branched rollouts (ARPO tree sampling, arXiv 2507.19849; AEPO, arXiv 2510.14545),
with soft or hard attribution of shared prefixes, in trajectory mode (one row per leaf,
`_prefix_owner`) and in step-wise mode (one row per turn an episode played, `_step_episodes`,
`_step_tree_credit`). Both take their group-relative advantage from `group.py`; what they add
is the bookkeeping of turns, anchors, parents and forks, which is why they live together.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from trainer.advantages.base import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageOutput,
    _adv_metrics,
    _broadcast,
    _segment_stats,
)
from trainer.advantages.group import GRPOParams, _grpo_per_sample, grpo

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
    episode's sum to its reward), not raw env rewards on another scale. `trainer/advantage_inputs.py` makes
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
