"""DAPO dynamic sampling and overlong shaping (arXiv 2503.14476 §3.2, §3.4) over a batch of samples.

`trainer/sampling.py` makes the decisions as pure functions of plain values ((group_id, reward)
pairs, lengths); this module carries them out on the rollout's `Trajectory` lists: one reward per
episode for the group filter (`select_groups`), the overlong penalty added to every sample of an
episode (`shape_overlong`), and the bookkeeping of several generation batches joined into one
update (`_shift_traj_ids`, `_merge_metrics`). No tensors, engines or ranks: the training loop
decides when to generate another batch.
"""

from __future__ import annotations

from agents.types import Trajectory
from trainer.config import OverlongConfig
from trainer.sampling import filter_groups, overlong_penalty


def episode_rewards(samples: list[Trajectory]) -> list[tuple[int, float]]:
    """(group_id, reward) once per episode (a step-wise episode's samples share its reward)."""
    seen: dict[int, tuple[int, float]] = {}
    for s in samples:
        seen.setdefault(s.traj_id, (s.group_id, s.reward))
    return list(seen.values())


def select_groups(samples: list[Trajectory], target_groups: int) -> tuple[list[Trajectory], list[int]]:
    """DAPO dynamic sampling: drop groups whose episode rewards are all equal (they carry no
    advantage), keep the first `target_groups` of the rest (fewer if there are not enough).
    Returns (kept samples in their original order, kept group ids)."""
    kept, _ = filter_groups(episode_rewards(samples))
    keep = set(kept[:target_groups])
    return [s for s in samples if s.group_id in keep], [g for g in kept if g in keep]


def episode_lengths(samples: list[Trajectory]) -> dict[int, int]:
    """Generated (sampled) tokens per episode, summed over its step-wise samples."""
    lengths: dict[int, int] = {}
    for s in samples:
        lengths[s.traj_id] = lengths.get(s.traj_id, 0) + s.num_sampled_tokens
    return lengths


def shape_overlong(samples: list[Trajectory], cfg: OverlongConfig) -> dict[str, float]:
    """Add DAPO's overlong penalty of each episode's generated-token count to its reward, on
    every sample of the episode (in place). Returns metrics; a no-op when disabled."""
    if not cfg.enabled or not samples:
        return {}
    lengths = episode_lengths(samples)
    penalty = {
        t: overlong_penalty(n, max_length=cfg.max_len, buffer=cfg.buffer, factor=cfg.factor)
        for t, n in lengths.items()
    }
    for s in samples:
        s.reward += penalty[s.traj_id]
    return {
        "reward/overlong_penalty": sum(penalty.values()) / len(penalty),
        "reward/overlong_frac": sum(p < 0 for p in penalty.values()) / len(penalty),
    }


def _shift_traj_ids(samples: list[Trajectory], offset: int) -> None:
    """Move a later generation batch's trajectory ids past the earlier batches' (the rollout
    numbers its episodes from 0; group ids are offset through the tasks instead)."""
    for s in samples:
        s.traj_id += offset


_SUMMED = ("time/", "rollout/episodes", "rollout/gen_tokens")


def _merge_metrics(batches: list[dict[str, float]]) -> dict[str, float]:
    """Rollout metrics of several generation batches (over every episode played, kept or not):
    times and counts summed, rates averaged over the batches that report them."""
    keys = {k for m in batches for k in m}
    merged = {}
    for k in sorted(keys):
        values = [m[k] for m in batches if k in m]
        merged[k] = sum(values) if k.startswith(_SUMMED) else sum(values) / len(values)
    return merged
