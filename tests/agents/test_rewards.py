"""Reward terms and their weighted composition (agents/rewards.py), on hand-made summaries.

Run: .venv/bin/python -m pytest tests/agents/test_rewards.py -q
"""

import pytest

from agents import rewards
from agents.rewards import REWARDS, compose

WON = {
    "won": True,
    "score": 2.0,
    "turns": 4,
    "parse_errors": 1,
    "generated_tokens": 30,
    "stop_reason": "terminated",
}
LOST = {**WON, "won": False, "score": 0.0, "turns": 0, "parse_errors": 0, "stop_reason": "env_error"}


def test_terms_by_hand():
    assert (REWARDS["success"](WON), REWARDS["success"](LOST)) == (1.0, 0.0)
    assert REWARDS["score"](WON) == 2.0
    assert REWARDS["invalid_action"](WON) == -0.25  # 1 unparsable reply in 4 turns
    assert REWARDS["invalid_action"](LOST) == 0.0  # no turns: no division by zero


def test_compose_weights():
    assert compose({"success": 1.0, "invalid_action": 0.5})(WON) == pytest.approx(1.0 - 0.5 * 0.25)
    assert compose({"success": 2.0, "score": -0.5})(WON) == pytest.approx(2.0 - 1.0)
    assert compose({"success": 1.0, "score": 1.0})(LOST) == 0.0
    assert compose({})(WON) == 0


def test_compose_is_linear_in_weights():
    a, b = compose({"success": 1.0}), compose({"invalid_action": 1.0})
    both = compose({"success": 3.0, "invalid_action": 2.0})
    for summary in (WON, LOST):
        assert both(summary) == pytest.approx(3 * a(summary) + 2 * b(summary))


def test_unknown_reward_lists_known_ones():
    with pytest.raises(KeyError, match="'sucess'.*known: invalid_action, score, success"):
        compose({"sucess": 1.0, "score": 1.0})


def test_registration(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))  # keep the real registry untouched

    @rewards.reward("short")
    def short(summary):
        return -summary["generated_tokens"] / 100

    assert compose({"short": 1.0, "success": 1.0})(WON) == pytest.approx(1.0 - 0.3)
    with pytest.raises(ValueError, match="already registered"):
        rewards.reward("short")(short)
