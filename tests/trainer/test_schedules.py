"""LR schedules (trainer/schedules.py) against hand-computed multipliers."""

import math

import pytest

from trainer.schedules import lr_multiplier


def test_constant_with_warmup():
    # warmup 4: steps 0..3 -> 1/4, 2/4, 3/4, 4/4; then 1
    assert [lr_multiplier(s, 10, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_the_floor():
    # total 10, warmup 2: decay over 8 steps; step 2 -> 1, step 6 (half-way) -> 0.1 + 0.9 * 0.5
    values = [lr_multiplier(s, 10, warmup=2, kind="cosine", min_ratio=0.1) for s in range(11)]
    assert values[:3] == [0.5, 1.0, 1.0]
    assert values[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert values[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert values[10] == pytest.approx(0.1) and min(values) == pytest.approx(0.1)
    assert lr_multiplier(50, 10, warmup=2, kind="cosine", min_ratio=0.1) == pytest.approx(0.1)  # past the end


def test_linear():
    assert [lr_multiplier(s, 4, kind="linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_unknown_schedule_names_the_key():
    with pytest.raises(ValueError, match="learner.lr_scheduler='step'.*cosine"):
        lr_multiplier(0, 10, kind="step")
