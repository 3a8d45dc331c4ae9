"""The pure parts of scripts/bench_vs_trl.py: the TRL side's answer check, EOS counting, the
step summary and the comparison table (no TRL install, no model)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tests.conftest import load_script

bench = load_script("bench_vs_trl")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{72}.", "72"),
        ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{2} and an unclosed \\boxed{3", "2"),
        ("no box here: 72", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert bench.last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("$1,080.", Fraction(1080)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-2.5 km", Fraction(-5, 2)),
        ("7/2", Fraction(7, 2)),
        ("x", None),
        (None, None),
    ],
)
def test_to_number(text, expected):
    assert bench.to_number(text) == expected


def test_correct_against_a_gsm8k_solution():
    reference = bench.gsm8k_reference("48/2 = <<48/2=24>>24\n#### 1,072")
    assert reference == "1072"
    assert bench.correct("... = \\boxed{1072}", reference) == 1.0
    assert bench.correct("... = \\boxed{1,072.00}", reference) == 1.0
    assert bench.correct("the answer is 1072", reference) == 0.0  # unboxed, as entrorl's boxed format
    assert bench.correct("\\boxed{1071}", reference) == 0.0


def test_first_eos_lengths():
    assert bench.first_eos_lengths([[5, 6, 2, 2], [5, 6, 7], [2, 9]], {2}) == [3, 3, 1]


def _step(step_s, gen_s, gen_tokens, learner_s, learner_tokens):
    return {
        "step_s": step_s,
        "gen_s": gen_s,
        "gen_tokens": gen_tokens,
        "reward_s": 0.5,
        "learner_s": learner_s,
        "learner_tokens": learner_tokens,
        "prompt_tokens": 100,
        "reward_mean": 0.0,
    }


def test_summarise_drops_warmup_and_pools_rates():
    steps = [_step(99.0, 90.0, 10, 8.0, 10), _step(10.0, 4.0, 40, 5.0, 100), _step(14.0, 6.0, 80, 7.0, 140)]
    s = bench.summarise(steps, warmup=1)
    assert s["steps_measured"] == 2
    assert s["gen_tokens_per_s"] == pytest.approx(120 / 10.0)
    assert s["learner_tokens_per_s"] == pytest.approx(240 / 12.0)
    assert s["step_s"] == pytest.approx(12.0)
    assert s["other_s"] == pytest.approx((24.0 - 10.0 - 12.0 - 1.0) / 2)


def test_table_ratios_are_entrorl_over_trl():
    keys = ["gen_tokens_per_s", "learner_tokens_per_s", "step_s", "peak_rss_mb", "prompt_tokens"]
    entrorl = dict.fromkeys(keys, 10.0)
    trl = dict.fromkeys(keys, 5.0)
    lines = bench.table(entrorl, trl).splitlines()
    assert (
        lines[0].split(" | ")[:4] == ["phase  ", "entrorl", "TRL", "entrorl/TRL"] or "entrorl/TRL" in lines[0]
    )
    gen = next(line for line in lines if line.startswith("generation tokens/s"))
    assert [c.strip() for c in gen.split("|")] == ["generation tokens/s", "10.0", "5.0", "2.00", "higher"]
    prompt = next(line for line in lines if line.startswith("prompt tokens"))
    assert prompt.split("|")[3].strip() == ""  # counts get no ratio
    assert len(lines) == 2 + len(keys)


def test_table_leaves_out_ratios_of_near_zero_phases():
    keys = ["reward_s", "step_s"]
    lines = bench.table(dict(reward_s=0.3, step_s=2.0), dict(reward_s=0.0002, step_s=4.0)).splitlines()
    reward = next(line for line in lines if "reward" in line)
    assert reward.split("|")[3].strip() == "-"
    step = next(line for line in lines if line.startswith("s / RL step"))
    assert step.split("|")[3].strip() == "0.50"
    assert len(lines) == 2 + len(keys)
