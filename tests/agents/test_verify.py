"""Math answer checking (agents/verify.py): math-verify in pool workers under hard timeouts.

The first check starts the pool's workers (~1-2 s: sympy); the rest take milliseconds.

Run: .venv/bin/python -m pytest tests/agents/test_verify.py -q
"""

import time

import pytest

from agents import verify
from agents.verify import Verdict, answer_of, math_equal, math_equal_batch

EQUAL = [
    ("\\boxed{0.5}", "\\frac{1}{2}"),  # fraction vs decimal
    ("1/2", "\\frac{1}{2}"),
    ("\\dfrac{14}{3}", "\\frac{14}{3}"),
    ("3\\sqrt{2}", "\\sqrt{18}"),  # LaTeX, simplified
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("\\{2, 1\\}", "\\{1, 2\\}"),  # sets
    ("(0, 1]", "(0,1]"),  # intervals
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # a MATH-500 tuple
    ("x^2+2x+1", "(x+1)^2"),
    ("She earns 5*3 = 15 more.\n#### 18", "18"),  # a GSM8K-style reply
    ("so the total is \\boxed{1,080}.", "1080"),
    ("Answer: 70 students", "70"),
    ("10\\%", "0.1"),
]
DIFFERENT = [
    ("\\boxed{17}", "18"),
    ("[0, 1]", "(0, 1]"),  # closed vs half-open
    ("0.333", "\\frac{1}{3}"),  # too coarse
    ("-5", "5"),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}"),
    ("x^2+1", "(x+1)^2"),
]
MALFORMED = ["", "\\boxed{}", "\\boxed{", "garbage {{ ]]", "#### ", "\\frac{", "<tool_call>{}</tool_call>"]


def test_table_in_one_batch():
    pairs = EQUAL + DIFFERENT + [(m, "3") for m in MALFORMED]
    verdicts = math_equal_batch(pairs, timeout=30.0)
    got = [bool(v) for v in verdicts]
    assert got == [True] * len(EQUAL) + [False] * (len(DIFFERENT) + len(MALFORMED)), list(
        zip(pairs, got, strict=True)
    )
    assert not any(v.timed_out or v.error for v in verdicts)


def test_a_hung_check_is_killed_and_counts_as_wrong():
    started = time.monotonic()
    verdict = math_equal("\\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0)
    assert verdict == Verdict(False, timed_out=True) and not verdict
    assert time.monotonic() - started < 5
    assert math_equal("\\frac{2}{4}", "0.5", timeout=30.0)  # the pool replaced the killed worker


def test_integers_skip_the_pool_and_the_pool_is_reused(monkeypatch):
    math_equal("\\frac{1}{3}", "1/3", timeout=30.0)
    pool = verify._get_pool()
    assert verify._get_pool() is pool
    monkeypatch.setattr(verify, "_get_pool", lambda: pytest.fail("plain integers need no worker"))
    assert math_equal("#### 1,000", "1000") and not math_equal("7", "8") and not math_equal("", "8")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("\\boxed{7}", "7"),
        ("#### 7", "7"),
        (" 7 ", "7"),
        ("The answer is: $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("", ""),
    ],
)
def test_answer_of(text, answer):
    assert answer_of(text) == answer


def test_prefetched_verdicts_are_reused_without_the_pool(monkeypatch):
    """A rollout checks every final reply in one parallel batch (`rewards.prefetch`); each
    episode's `math_verify` reward then finds its verdict without a pool round trip."""
    from agents.rewards import math_verify, prefetch

    summaries = [
        {"task": {"answer": "1/2"}, "actions": ["so \\boxed{0.5}"], "won": False},
        {"task": {"answer": "\\frac{3}{4}"}, "actions": ["\\boxed{0.7}"], "won": False},
    ]
    prefetch(summaries, {"math_verify": 1.0})

    def no_pool():
        raise AssertionError("the pool was asked again")

    monkeypatch.setattr(verify, "_get_pool", no_pool)
    assert [math_verify(s) for s in summaries] == [1.0, 0.0]
    prefetch(summaries, {"success": 1.0})  # nothing to check without the math_verify term
