"""Rollout-side decisions as pure functions: which episodes an update may train on
(infrastructure failures), DAPO dynamic sampling and overlong reward shaping (arXiv 2503.14476
§3.2, §3.4), and Arbitrary-Entropy PO's temperature switch.

Inputs are plain Python values (lists of (group_id, reward), lengths, advantages); the rollout
loop carries the decisions out (generate another batch, drop groups, add a reward term).

This module knows nothing about tensors, engines or environments.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

# --------------------------------------------------------------------------------------------
# Episodes the policy did not end

# Stop reasons that say nothing about the policy: the env or its worker crashed, the engine
# failed the request, the episode hung past its wall-clock budget. Their reward (0) is not the
# policy's failure; trained on, it would push down whatever the policy did before the fault.
INFRA_FAILURES = ("env_error", "engine_error", "timeout")


def infra_failed_episodes(episodes: Sequence[tuple[int, int | None, str]]) -> set[int]:
    """Episode ids to leave out of an update, from (traj_id, parent_id, stop_reason) rows.

    An episode that stopped on an infrastructure failure, and every branch forked from it
    (directly or through other branches): a branch's tree credit is taken against its parent,
    which is no longer in the batch. Rows may repeat an episode (step-wise samples).
    """
    failed = {traj for traj, _, reason in episodes if reason in INFRA_FAILURES}
    parents = {traj: parent for traj, parent, _ in episodes}
    for traj in parents:
        chain, node = [], traj
        while node is not None and node not in failed:
            chain.append(node)
            node = parents.get(node)
        if node is not None:  # reached a failed ancestor
            failed.update(chain)
    return failed


# --------------------------------------------------------------------------------------------
# DAPO dynamic sampling


def filter_groups(
    samples: Sequence[tuple[Hashable, float]], *, atol: float = 0.0
) -> tuple[list[Hashable], list[Hashable]]:
    """(kept, dropped) group ids, in order of first appearance.

    A group is dropped when all its rewards are equal (max - min <= atol): every sample gets
    advantage 0 and the group only dilutes the batch. A group of one sample is therefore always
    dropped (dynamic sampling needs group_size >= 2).
    """
    rewards: dict[Hashable, list[float]] = {}
    for group_id, reward in samples:
        rewards.setdefault(group_id, []).append(float(reward))
    kept = [g for g, r in rewards.items() if max(r) - min(r) > atol]
    dropped = [g for g, r in rewards.items() if max(r) - min(r) <= atol]
    return kept, dropped


@dataclass(frozen=True)
class DynamicSamplingDecision:
    action: Literal["train", "generate", "abort"]
    keep: list[Hashable]  # groups to train on (exactly target_groups when action == "train")
    dropped: list[Hashable]
    metrics: dict[str, float] = field(default_factory=dict)


def dynamic_sampling_decision(
    samples: Sequence[tuple[Hashable, float]],
    *,
    target_groups: int,
    gen_batches: int,
    max_gen_batches: int = 10,
    atol: float = 0.0,
) -> DynamicSamplingDecision:
    """DAPO dynamic sampling, arXiv 2503.14476 §3.2, after `gen_batches` generation rounds.

    `samples` are all (group_id, reward) pairs generated so far (group ids unique across
    rounds). Keep the groups with differing rewards; with at least `target_groups` of them,
    "train" on the first `target_groups` (surplus groups are discarded, as verl truncates);
    otherwise "generate" another round, or "abort" once `gen_batches >= max_gen_batches`
    (max_gen_batches <= 0 = unlimited; verl raises there: the data is too easy or too hard).
    """
    if target_groups < 1:
        raise ValueError(f"target_groups must be >= 1, got {target_groups}")
    kept, dropped = filter_groups(samples, atol=atol)
    total = len(kept) + len(dropped)
    metrics = {
        "rollout/dyn_kept_groups": float(len(kept)),
        "rollout/dyn_kept_frac": len(kept) / total if total else 0.0,
        "rollout/dyn_gen_batches": float(gen_batches),
    }
    if len(kept) >= target_groups:
        return DynamicSamplingDecision("train", kept[:target_groups], dropped, metrics)
    if max_gen_batches <= 0 or gen_batches < max_gen_batches:
        return DynamicSamplingDecision("generate", kept, dropped, metrics)
    return DynamicSamplingDecision("abort", kept, dropped, metrics)


# --------------------------------------------------------------------------------------------
# DAPO overlong reward shaping


def overlong_penalty(
    length: int, *, max_length: int = 20480, buffer: int = 4096, factor: float = 1.0
) -> float:
    """R_len = min(-(|y| - (L_max - L_c)) / L_c * f, 0), arXiv 2503.14476 §3.4 (added to the reward).

    0 up to L_max - L_c, then linear down to -f at L_max (and further below past L_max, as
    verl: it does not clamp, though responses are normally cut at L_max).
    """
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    return min(-(length - (max_length - buffer)) / buffer * factor, 0.0)


# --------------------------------------------------------------------------------------------
# Arbitrary-Entropy PO (arXiv 2510.08141): temperature switch and sample selection


def switch_temperature(
    entropy: float | None, target: float, temperature_high: float = 1.2, temperature_low: float = 0.8
) -> float:
    """T_high if the previous step's entropy is below target (or unknown), else T_low."""
    return temperature_high if entropy is None or entropy < target else temperature_low


def select_reinforce_samples(
    advantages: Sequence[float],
    *,
    entropy: float | None,
    target: float,
    threshold: float = 0.05,
    max_samples: int = 60,
) -> list[int]:
    """Indices of the temperature-T samples that enter the REINFORCE term (advantage set to +1).

    Keep samples with GRPO advantage > threshold, in order; take s = min(max_samples, kept) of
    them if entropy <= target (or unknown), else floor(s / 2) (the reference code).
    """
    kept = [i for i, a in enumerate(advantages) if a > threshold]
    count = min(max_samples, len(kept))
    if entropy is not None and entropy > target:
        count = math.floor(count / 2)
    return kept[:count]
