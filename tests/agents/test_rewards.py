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
    with pytest.raises(KeyError, match="'sucess'.*known: format, invalid_action, math_verify, score, success, tool_use"):
        compose({"sucess": 1.0, "score": 1.0})


def test_registration(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))  # keep the real registry untouched

    @rewards.reward("short")
    def short(summary):
        return -summary["generated_tokens"] / 100

    assert compose({"short": 1.0, "success": 1.0})(WON) == pytest.approx(1.0 - 0.3)
    with pytest.raises(ValueError, match="already registered"):
        rewards.reward("short")(short)


# -- math terms: the summary's task carries the reference, its actions the raw replies ---------------

CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'
MATH = {**WON, "task": {"question": "6 * 7?", "answer": "42"}, "actions": [CALL, "It is \\boxed{42}."]}


@pytest.mark.parametrize(
    "summary, expected",
    [
        (MATH, {"math_verify": 1.0, "format": 1.0, "tool_use": 1.0}),
        ({**MATH, "actions": ["#### 42"]}, {"math_verify": 1.0, "format": 0.0, "tool_use": 0.0}),  # no box, no tool
        ({**MATH, "won": False, "actions": [CALL, "\\boxed{41}"]}, {"math_verify": 0.0, "format": 1.0, "tool_use": 0.0}),
        ({**MATH, "actions": ["\\boxed{42}", CALL]}, {"math_verify": 0.0, "format": 0.0, "tool_use": 1.0}),  # ends on a call
        ({**MATH, "actions": ["<tool_call>{bad</tool_call>", "\\boxed{42}"]}, {"math_verify": 1.0, "format": 1.0, "tool_use": 0.0}),
        ({**MATH, "task": {"question": "q", "answer": "\\frac{1}{2}"}, "actions": ["\\boxed{0.5}"]}, {"math_verify": 1.0}),
        ({**MATH, "actions": []}, {"math_verify": 0.0, "format": 0.0, "tool_use": 0.0}),
        ({**WON, "task": {}, "actions": ["no answer"]}, {"math_verify": 1.0, "format": 0.0}),  # no reference: `won`
        ({**LOST, "task": {}, "actions": ["no answer"]}, {"math_verify": 0.0}),
    ],
)
def test_math_terms_by_hand(summary, expected):
    assert {name: REWARDS[name](summary) for name in expected} == expected


def test_math_terms_compose():
    assert compose({"math_verify": 1.0, "format": 0.1, "tool_use": 0.2})(MATH) == pytest.approx(1.3)
