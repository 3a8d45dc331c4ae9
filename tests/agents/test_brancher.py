"""The brancher's pure decisions (agents/brancher.py) on hand-made entropies."""

import math
import random

import pytest

from agents.brancher import (
    BranchConfig,
    GroupState,
    PathView,
    aepo_probability,
    arpo_probability,
    decide_turn_branches,
    initial_roots,
    premonitor_roots,
    step_entropy,
    token_fork_points,
)


class Always:
    """A random source whose draws are all `value` (0.0: every Bernoulli succeeds)."""

    def __init__(self, value: float):
        self.value = value
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self.value


def test_step_entropy_is_the_mean_of_the_window():
    assert step_entropy([1.0, 2.0, 3.0, 10.0], window=3) == 2.0
    assert step_entropy([4.0], window=20) == 4.0 and step_entropy([], window=20) == 0.0


def test_arpo_probability_matches_the_code_form():
    # P = clip(tau + w dH): tau 0.5, w 0.2, dH 1 -> 0.7; a fall of 5 -> 0 (clipped)
    assert arpo_probability(1.0, 0.5, 0.2) == pytest.approx(0.7)
    assert arpo_probability(-5.0, 0.5, 0.2) == 0.0 and arpo_probability(10.0, 0.5, 0.2) == 1.0


def test_aepo_probability_and_its_consecutive_penalty():
    # l = 0: same as ARPO. l = 1: f = 0.95, P = 1 - 0.5/0.95 + 0.2 dH. l = 10: f = 0.5 -> P = w dH.
    assert aepo_probability(1.0, 0.5, 0.2, 0, 0.05) == pytest.approx(arpo_probability(1.0, 0.5, 0.2))
    assert aepo_probability(0.0, 0.5, 0.2, 1, 0.05) == pytest.approx(1 - 0.5 / 0.95)
    assert aepo_probability(1.0, 0.5, 0.2, 10, 0.05) == pytest.approx(0.2)
    assert aepo_probability(3.0, 0.5, 0.2, 20, 0.05) == 0.0  # f = 0: the path never branches


def test_premonitor_split():
    # k 8, H_root = H_tool: floor(8 * 0.5) + 1 = 5 roots; a much more uncertain question -> all 8
    assert premonitor_roots(8, 1.0, 1.0, 0.5) == 5
    assert premonitor_roots(8, 50.0, 0.0, 0.5) == 8
    assert premonitor_roots(8, 0.0, 50.0, 0.5) == 1  # floor(~0) + 1
    s = 1 / (1 + math.exp(-0.5 * 2.0))
    assert premonitor_roots(10, 3.0, 1.0, 0.5) == math.floor(10 * s) + 1


def test_initial_roots_per_policy():
    assert initial_roots(BranchConfig("none"), 8) == 8
    assert initial_roots(BranchConfig("arpo"), 8) == 4 and initial_roots(BranchConfig("arpo", roots=3), 8) == 3
    assert initial_roots(BranchConfig("token", forks=1, continuations=3), 16) == 4  # CURE: 4 x (1 + 3)


def paths(*deltas, first=1.0):
    return [PathView(i, first, first + d) for i, d in enumerate(deltas)]


def test_no_branch_without_an_entropy_rise_when_tau_is_zero_based():
    # tau 0, w 0.2: P = 0.2 dH; no rise -> P = 0, whatever the draws
    cfg = BranchConfig("arpo", tau=0.0, weight=0.2, beam=3)
    state = GroupState(budget=8, used=4)
    assert decide_turn_branches(paths(0.0, -1.0), state, cfg, random.Random(0)) == {}
    assert state.used == 4 and state.consecutive == 0


def test_budget_is_never_exceeded_and_draws_do_not_depend_on_it():
    cfg = BranchConfig("arpo", beam=3)  # up to 2 copies per path
    rng = Always(0.0)  # every draw succeeds
    state = GroupState(budget=5, used=2)
    copies = decide_turn_branches(paths(1.0, 1.0, 1.0), state, cfg, rng)
    assert copies == {0: 2, 1: 1} and state.used == 5 and state.left == 0
    assert rng.draws == 6  # 3 paths x 2 draws, budget or not
    assert decide_turn_branches(paths(1.0), state, cfg, rng) == {} and state.used == 5


def test_ended_paths_never_branch():
    state = GroupState(budget=8, used=2)
    views = [PathView(0, 1.0, 5.0, can_branch=False), PathView(1, 1.0, 5.0)]
    assert decide_turn_branches(views, state, BranchConfig("arpo"), Always(0.0)) == {1: 1}


def test_consecutive_penalty_group_scope_vs_path_scope():
    # draws of 0.4: P(l=0) = 0.5 + 0 = 0.5 > 0.4 branches; P(l=1) = 1 - 0.5/0.95 = 0.47 > 0.4;
    # P(l=2) = 1 - 0.5/0.9 = 0.444 > 0.4; P(l=3) = 1 - 0.5/0.85 = 0.41 > 0.4; l=4: 0.375 < 0.4
    cfg = BranchConfig("aepo", beam=2, penalty=0.05)
    state = GroupState(budget=100, used=1)
    made = [decide_turn_branches(paths(0.0), state, cfg, Always(0.4)) for _ in range(5)]
    assert made == [{0: 1}] * 4 + [{}]
    assert state.consecutive == 0  # a round without a branch resets the group counter

    # path scope: path 1's own history; path 0 branching does not penalise path 1
    cfg = BranchConfig("aepo", beam=2, penalty=0.05, penalty_scope="path")
    state = GroupState(budget=100, used=2, path_consecutive={0: 4})
    assert decide_turn_branches(paths(0.0, 0.0), state, cfg, Always(0.4)) == {1: 1}
    assert state.path_consecutive == {0: 0, 1: 1}


def test_tie_order_is_the_given_path_order():
    state = GroupState(budget=3, used=2)  # room for one branch
    assert decide_turn_branches(paths(1.0, 1.0), state, BranchConfig("arpo"), Always(0.0)) == {0: 1}


def test_none_and_token_policies_make_no_turn_branches():
    for policy in ("none", "token"):
        assert decide_turn_branches(paths(9.0), GroupState(8, 1), BranchConfig(policy), Always(0.0)) == {}


def test_token_fork_points():
    h = [0.1, 2.0, 0.3, 5.0, 5.0, 0.2, 4.0]
    ok = [True, True, True, True, False, True, True]  # position 4 is a special token
    # ETMR: the 2 highest eligible entropies -> 3 (5.0) and 6 (4.0)
    assert token_fork_points(h, ok, BranchConfig("token", forks=2, token_choice="top"), random.Random(0)) == [3, 6]
    # CURE top-K 3 = {3, 6, 1}: one uniform draw among them, every one reachable
    cfg = BranchConfig("token", forks=1, top_k=3)
    seen = {token_fork_points(h, ok, cfg, random.Random(seed))[0] for seed in range(50)}
    assert seen == {1, 3, 6}
    assert token_fork_points(h, [False] * 7, cfg, random.Random(0)) == []
    # ties: equal entropies keep the earlier token first
    assert token_fork_points([1.0, 1.0, 1.0], [True] * 3, BranchConfig("token", forks=2, token_choice="top"),
                             random.Random(0)) == [0, 1]  # fmt: skip


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="rollout.branch.policy='cure'"):
        BranchConfig("cure")
    with pytest.raises(ValueError, match="penalty_scope"):
        BranchConfig("aepo", penalty_scope="rank")
