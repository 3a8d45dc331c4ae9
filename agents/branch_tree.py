"""The branching state of one rollout run: which paths a group has, and where they may fork.

agents/brancher.py decides (pure functions of entropies and budgets); agents/rollout.py executes
(forks envs, plays episodes). Between them, the trees here keep one run's bookkeeping per group:
the budget, the brancher's `GroupState`, the template new roots are made from, the entropies of
the turns or tokens that were forked at and those that were not, and the branch metrics.
`_Tree` is turn-level branching (ARPO/AEPO), `_TokenTree` token-level (CURE/ETMR); `_head` and
`_joined` cut a reply at a token fork and splice a branch's continuation onto the parent's head.
Split out of the rollout loop so that the loop reads as rounds of engine and env calls; kept
apart from the brancher, which knows no episodes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from agents.brancher import (
    BranchConfig,
    GroupState,
    PathView,
    decide_turn_branches,
    initial_roots,
    step_entropy,
    token_fork_points,
)
from agents.episode_records import Task, _Episode
from agents.types import GenerationResult


def _head(result: GenerationResult, j: int) -> GenerationResult:
    """The first j sampled tokens of a reply, with their log-probs and entropies."""
    return GenerationResult(result.token_ids[:j], result.logprobs[:j], result.entropies[:j], "length", result.entropy_is_exact)


def _joined(prefix: GenerationResult, rest: GenerationResult) -> GenerationResult:
    """A fork turn's reply: the parent's prefix, then what the engine sampled after it."""
    return GenerationResult(
        prefix.token_ids + rest.token_ids,
        prefix.logprobs + rest.logprobs,
        prefix.entropies + rest.entropies,
        rest.finish_reason,
        prefix.entropy_is_exact and rest.entropy_is_exact,
    )


class _Tree:
    """Branching state of one `run`: per group, the budget (the group's task count = leaves),
    the brancher's `GroupState`, and the task template new roots are made from. Made fresh
    every run, so nothing leaks across training steps."""

    def __init__(self, cfg: BranchConfig, tasks: list[Task], seed: int | None, roots: dict[int, int] | None = None):
        self.cfg = cfg
        # With no seed (training), draw from the global RNG that checkpoints restore.
        self.rng = random.Random(seed if seed is not None else random.getrandbits(64))
        by_group: dict[int, list[Task]] = {}
        for task in tasks:
            by_group.setdefault(task.group_id, []).append(task)
        self.template = {g: group[0] for g, group in by_group.items()}
        self.states: dict[int, GroupState] = {}
        self.roots: list[Task] = []
        for g, group in by_group.items():
            m = roots[g] if roots is not None else initial_roots(cfg, len(group))  # pre-monitored
            self.states[g] = GroupState(budget=len(group), used=m)
            self.roots += group[:m]
        self.premonitored = roots
        self.fork_entropies: list[float] = []  # step entropy of the turns that were forked after
        self.other_entropies: list[float] = []

    def decide(self, stepped: list[_Episode], window: int) -> list[_Episode]:
        """The episodes to fork now (one entry per copy), group by group."""
        by_group: dict[int, list[_Episode]] = {}
        for ep in stepped:
            by_group.setdefault(ep.task.group_id, []).append(ep)
        parents: list[_Episode] = []
        for g, group in sorted(by_group.items()):
            views = [
                PathView(
                    i,
                    step_entropy(ep.turns[0].result.entropies, window),
                    step_entropy(ep.turns[-1].result.entropies, window),
                    can_branch=ep.stop_reason is None,
                )
                for i, ep in enumerate(group)
            ]
            copies = decide_turn_branches(views, self.states[g], self.cfg, self.rng)
            for i, view in enumerate(views):
                (self.fork_entropies if i in copies else self.other_entropies).append(view.last_entropy)
                parents += [group[i]] * copies.get(i, 0)
        return parents

    def refill(self, skip: set[int]) -> list[Task]:
        """Tasks for the unused budget of every group not in `skip` (groups with live paths)."""
        fresh = []
        for g, state in self.states.items():
            if g not in skip and state.left > 0:
                fresh += [replace(self.template[g]) for _ in range(state.left)]
                state.used = state.budget
        return fresh

    def metrics(self, episodes: list[_Episode]) -> dict[str, float]:
        groups = max(len(self.states), 1)
        branches = [ep for ep in episodes if ep.parent_id is not None]
        roots = [ep for ep in episodes if ep.parent_id is None]
        depth = {ep.traj_id: 0 for ep in roots}
        for ep in sorted(branches, key=lambda e: e.traj_id):  # a parent has a smaller traj_id
            depth[ep.traj_id] = depth.get(ep.parent_id, 0) + 1
        # turns before the fork, plus a token-level branch's inherited head of its fork turn
        shared = sum(sum(len(t.result.token_ids) for t in ep.turns[: ep.fork_turn]) + ep.fork_offset for ep in branches)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return {
            "branch/per_group": len(branches) / groups,
            "branch/max_depth": float(max(depth.values(), default=0)),
            "branch/fork_entropy": mean(self.fork_entropies),
            "branch/other_entropy": mean(self.other_entropies),
            "branch/budget_used": sum(s.used for s in self.states.values()) / max(sum(s.budget for s in self.states.values()), 1),
            # generated tokens a branch did not have to sample again (flat sampling would have)
            "branch/tokens_saved": float(shared),
            "branch/success_root": mean([float(ep.won) for ep in roots]),
            "branch/success_branch": mean([float(ep.won) for ep in branches]),
        }


class _TokenTree(_Tree):
    """Token-level branching (CURE/ETMR) for one rollout: per group, `initial_roots` roots play
    whole episodes; then each finished root forks at `forks` token positions the brancher picks
    among its sampled tokens (`token_fork_points`), `continuations` branches each; budget left
    (a root with too few eligible tokens, a reset failure) becomes fresh roots (`refill`).
    Budget, templates, refill and metrics are `_Tree`'s. Made fresh every run."""

    def fork_points(self, episodes: list[_Episode], eligible: Callable[[int], bool]) -> list[tuple[_Episode, int, int]]:
        """(root, turn k, token j) once per branch to make, within each group's budget."""
        points = []
        for ep in episodes:
            state = self.states[ep.task.group_id]
            flat = [(k, j) for k, t in enumerate(ep.turns) for j in range(len(t.result.token_ids))]
            if not flat or ep.handle is None:
                continue
            entropies = [ep.turns[k].result.entropies[j] for k, j in flat]
            ok = [eligible(ep.turns[k].result.token_ids[j]) for k, j in flat]
            chosen = token_fork_points(entropies, ok, self.cfg, self.rng)
            self.fork_entropies += [entropies[i] for i in chosen]
            self.other_entropies += [h for i, h in enumerate(entropies) if ok[i] and i not in chosen]
            for i in chosen:
                made = min(self.cfg.continuations, state.left)
                state.used += made
                points += [(ep, *flat[i])] * made
        return points
