"""The soak runner's verdict (scripts/soak.py `analyze`, pure): it passes flat series and flags a
growing RSS, leaking fds or processes, and slowing steps. The soak itself is a 30-minute run:
`DS_ACCELERATOR=cpu .venv/bin/python scripts/soak.py --minutes 30`.

Run: .venv/bin/python -m pytest tests/test_soak.py -q
"""

import math

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def soak():
    return load_script("soak")


def records(n=200, rss=lambda i: 500.0, fds=lambda i: 34, children=lambda i: 4, step_s=lambda i: 1.0):
    """One record a step, 9 s apart (30 minutes for 200 steps), with a little noise that repeats."""
    noise = [math.sin(i * 1.7) for i in range(n)]
    return [
        {
            "step": i + 1,
            "t": 9.0 * (i + 1),
            "rss_mb": rss(i) + 20 * noise[i],
            "rss_children_mb": 150.0,
            "rss_total_mb": rss(i) + 150.0 + 20 * noise[i],
            "fds": fds(i) + (i % 7 == 0),  # a file open now and then during a step (checkpoints)
            "child_fds": 33,
            "children": children(i),
            "threads": 13,
            "step_s": step_s(i) * (1 + 0.2 * noise[i]) + (5.0 if i == 0 else 0.0),  # a slow first step
            "tokens_per_s": 150.0,
        }
        for i in range(n)
    ]


def test_a_flat_run_passes(soak):
    verdict = soak.analyze(records())
    assert verdict["problems"] == [], verdict["problems"]
    assert abs(verdict["rss_total_mb"]["change_pct"]) < 5
    assert abs(verdict["rss_total_mb"]["slope_mb_per_hour_2nd_half"]) < 60
    assert verdict["fds"] == {"min": 34, "max": 35, "first": 35, "last": 34, "grew_steadily": False}
    assert 0.8 < verdict["step_s"]["ratio"] < 1.25
    assert "VERDICT: PASS" in soak.format_verdict(verdict)


def test_growing_rss_is_flagged(soak):
    verdict = soak.analyze(records(rss=lambda i: 500.0 + 3.0 * i))  # +600 MB over the run
    assert any("RSS grew" in p for p in verdict["problems"]), verdict["problems"]
    rss = verdict["rss_total_mb"]
    # 3 MB a step, 400 steps an hour
    assert rss["slope_mb_per_hour_2nd_half"] == pytest.approx(1200, rel=0.05)
    assert rss["growth_pct_2nd_half"] > 20 and rss["change_pct"] > 70
    assert "VERDICT: FAIL" in soak.format_verdict(verdict)


def test_a_one_off_rise_in_rss_is_not_a_leak(soak):
    """Memory that settles at a higher level early (caches warming up) is not growth."""
    verdict = soak.analyze(records(rss=lambda i: 500.0 if i < 20 else 700.0))
    assert verdict["problems"] == [], verdict["problems"]


def test_leaking_fds_and_processes_are_flagged(soak):
    verdict = soak.analyze(records(fds=lambda i: 34 + i // 10, children=lambda i: 4 + i // 50))
    problems = " | ".join(verdict["problems"])
    assert "fds grew steadily" in problems and "children grew steadily" in problems
    assert verdict["children"]["max"] == 7 and verdict["children"]["grew_steadily"]
    assert not verdict["threads"]["grew_steadily"]


def test_slowing_steps_are_flagged(soak):
    verdict = soak.analyze(records(step_s=lambda i: 1.0 + i / 100))  # 1 s -> 3 s
    assert any("step time grew" in p for p in verdict["problems"]), verdict["problems"]
    assert verdict["step_s"]["ratio"] > 1.5


def test_too_few_steps_fail(soak):
    verdict = soak.analyze(records(n=3))
    assert verdict["problems"] and "too few steps" in soak.format_verdict(verdict)
