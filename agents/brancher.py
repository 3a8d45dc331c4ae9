"""The entropy-aware brancher: pure decisions of where to fork a group's episodes.

No engine, no env: functions of entropies, budgets and branch history, with randomness drawn
from an explicit `random.Random`. The rollout loop (agents/rollout.py) executes what they decide.

Policies (ARPO arXiv 2507.19849, AEPO arXiv 2510.14545, CURE arXiv 2508.11016, ETTRL's ETMR
arXiv 2508.11356):
- `none`:  flat sampling, every episode a root (the baseline).
- `arpo`:  after each env/tool step, a path whose step entropy rose against its first turn's
           branches with probability clip(tau + w * dH, 0, 1), up to beam - 1 copies per round,
           until the group's budget is used (ARPO's released code).
- `aepo`:  ARPO with AEPO's consecutive-branch penalty, P = clip(1 - tau / f + w * dH, 0, 1),
           f = max(0, 1 - penalty * l), l = consecutive rounds that branched (scope "group": per
           group, the code's behaviour; "path": per path, the paper's wording), and optionally
           the entropy pre-monitoring split of the budget, m = clamp(floor(k * sigmoid(beta *
           (H_root - H_tool))) + 1, 1, k) roots.
- `token`: CURE: fork a finished response at a token drawn uniformly among its top-K entropy
           tokens; ETMR (`token_choice: "top"`): the N highest-entropy tokens, B continuations each.

Differences from the reference code, on purpose: the step entropy is the exact mean entropy of
the first `entropy_window` sampled tokens of a turn (theirs: a pooled top-10 logprob proxy over
20 tokens, divided by log|V|); state is per group and per training step (theirs keeps each
rollout's initial entropy across steps).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

POLICIES = ("none", "arpo", "aepo", "token")


@dataclass
class BranchConfig:
    policy: str = "none"  # none | arpo | aepo | token
    roots: int = 0  # episodes started per group (m); 0 = half the group (ARPO's initial_rollouts)
    beam: int = 2  # Z: a path and at most beam - 1 copies per round
    tau: float = 0.5  # branch threshold
    weight: float = 0.2  # w: how much an entropy rise raises the branch probability
    entropy_window: int = 20  # sampled tokens at the start of a turn that define its step entropy
    penalty: float = 0.05  # aepo: P^(l) = penalty * l, the consecutive-branch penalty
    penalty_scope: str = "group"  # aepo: group (released code) | path (paper wording)
    premonitor: bool = False  # aepo: split the budget by H_root vs H_tool of one probe episode per group
    beta: float = 0.5  # aepo pre-monitoring sigmoid slope
    top_k: int = 20  # token: CURE picks uniformly among a response's top-K entropy tokens
    forks: int = 1  # token: fork points per root response (ETMR N)
    continuations: int = 3  # token: continuations per fork point (CURE n2, ETMR B)
    token_choice: str = "random_top_k"  # token: random_top_k (CURE) | top (ETMR)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"rollout.branch.policy={self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.penalty_scope not in ("group", "path"):
            raise ValueError(f"rollout.branch.penalty_scope={self.penalty_scope!r}: use group or path")
        if self.token_choice not in ("random_top_k", "top"):
            raise ValueError(f"rollout.branch.token_choice={self.token_choice!r}: use random_top_k or top")
        if self.beam < 1 or self.entropy_window < 1 or self.top_k < 1:
            raise ValueError("rollout.branch.beam, entropy_window and top_k must be >= 1")


# -- entropy summaries and probabilities (the math, each a line) --------------------------------


def step_entropy(entropies: list[float], window: int) -> float:
    """Mean entropy of the first `window` sampled tokens of a turn (0 for an empty turn)."""
    head = entropies[:window]
    return sum(head) / len(head) if head else 0.0


def arpo_probability(delta_h: float, tau: float, weight: float) -> float:
    """ARPO (arXiv 2507.19849), released code: q = clip(U - w dH, 0, 1), branch iff q <= tau
    =>  P = clip(tau + w dH, 0, 1)."""
    return min(max(tau + weight * delta_h, 0.0), 1.0)


def aepo_probability(delta_h: float, tau: float, weight: float, consecutive: int, penalty: float) -> float:
    """AEPO (arXiv 2510.14545), released code: q = clip((U + w dH) f, 0, 1), branch iff q >= tau,
    f = max(0, 1 - penalty l)
    =>  P = clip(1 - tau / f + w dH, 0, 1), and 0 once f = 0."""
    f = max(0.0, 1.0 - penalty * consecutive)
    if f == 0.0:
        return 0.0 if tau > 0 else 1.0
    return min(max(1.0 - tau / f + weight * delta_h, 0.0), 1.0)


def premonitor_roots(budget: int, h_root: float, h_tool: float, beta: float) -> int:
    """AEPO pre-monitoring (arXiv 2510.14545):
    m = clamp(floor(k sigmoid(beta (H_root - H_tool))) + 1, 1, k)."""
    sigmoid = 1.0 / (1.0 + math.exp(-beta * (h_root - h_tool)))
    return min(max(math.floor(budget * sigmoid) + 1, 1), budget)


def initial_roots(cfg: BranchConfig, budget: int) -> int:
    """Roots a group starts with: the whole budget without branching, else `roots` (or half)."""
    if cfg.policy == "none":
        return budget
    if cfg.policy == "token":  # each root spawns forks * continuations leaves
        per_root = 1 + cfg.forks * cfg.continuations
        return max(1, budget // per_root)
    return min(max(cfg.roots or budget // 2, 1), budget)


# -- turn-level branching (arpo / aepo) ---------------------------------------------------------


@dataclass
class PathView:
    """What the brancher sees of one live path after an env step."""

    path_id: int
    first_entropy: float  # step entropy of the path's first turn (H_initial)
    last_entropy: float  # step entropy of the turn that just ran
    can_branch: bool = True  # False once the path ended or has no room left


@dataclass
class GroupState:
    """One group's branching state for one rollout (made fresh every training step)."""

    budget: int  # k: episodes (leaves) the group may have in total
    used: int  # episodes started so far (roots + branches)
    consecutive: int = 0  # group scope: rounds in a row that created a branch
    path_consecutive: dict[int, int] = field(default_factory=dict)  # path scope

    @property
    def left(self) -> int:
        return self.budget - self.used


def decide_turn_branches(
    paths: list[PathView], state: GroupState, cfg: BranchConfig, rng: random.Random
) -> dict[int, int]:
    """{path_id: copies to fork now} for one round of one group; updates `state`. Policies "arpo"
    (arXiv 2507.19849) and "aepo" (arXiv 2510.14545); see the module docstring for departures.

    Each eligible path gets up to beam - 1 independent draws, stopped by the budget. Paths are
    visited in the given order; the draws happen whether or not budget is left, so the random
    stream does not depend on the budget (two groups with equal entropies decide alike).
    """
    if cfg.policy not in ("arpo", "aepo"):
        return {}
    copies: dict[int, int] = {}
    for path in paths:
        if not path.can_branch:
            continue
        delta = path.last_entropy - path.first_entropy
        if cfg.policy == "arpo":
            p = arpo_probability(delta, cfg.tau, cfg.weight)
        else:
            streak = state.consecutive if cfg.penalty_scope == "group" else state.path_consecutive.get(path.path_id, 0)
            p = aepo_probability(delta, cfg.tau, cfg.weight, streak, cfg.penalty)
        made = 0
        for _ in range(cfg.beam - 1):
            if rng.random() < p and state.left > 0:
                made += 1
                state.used += 1
        if made:
            copies[path.path_id] = made
        if cfg.penalty_scope == "path":
            state.path_consecutive[path.path_id] = state.path_consecutive.get(path.path_id, 0) + 1 if made else 0
    state.consecutive = state.consecutive + 1 if copies else 0
    return copies


# -- token-level forks (CURE / ETMR) ------------------------------------------------------------


def token_fork_points(
    entropies: list[float], eligible: list[bool], cfg: BranchConfig, rng: random.Random
) -> list[int]:
    """Positions of a finished response to fork at (the fork token is re-sampled, so the
    continuation conditions on tokens [0, position)). Ineligible tokens (special tokens, tokens
    of <= 1 visible character, env/tool tokens) never count. CURE (arXiv 2508.11016): `forks`
    distinct positions drawn uniformly among the top-K eligible entropies; ETMR ("top", ETTRL,
    arXiv 2508.11356): the `forks` highest."""
    candidates = [i for i, ok in enumerate(eligible) if ok and i < len(entropies)]
    if not candidates:
        return []
    # highest entropy first; ties go to the earlier token (a stable, testable order)
    ranked = sorted(candidates, key=lambda i: (-entropies[i], i))
    if cfg.token_choice == "top":
        return sorted(ranked[: cfg.forks])
    pool = ranked[: cfg.top_k]
    return sorted(rng.sample(pool, min(cfg.forks, len(pool))))
