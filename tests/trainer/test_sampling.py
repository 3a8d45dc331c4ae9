"""DAPO dynamic sampling and overlong shaping, Arbitrary-Entropy PO selection. Run: pytest tests/trainer/test_sampling.py"""

import pytest

from trainer.sampling import (
    dynamic_sampling_decision,
    filter_groups,
    overlong_penalty,
    select_reinforce_samples,
    switch_temperature,
)

# group "a" mixed, "b" all 1, "c" all 0, "d" a single sample, "e" mixed
SAMPLES = [
    ("a", 1.0),
    ("b", 1.0),
    ("a", 0.0),
    ("b", 1.0),
    ("c", 0.0),
    ("c", 0.0),
    ("d", 1.0),
    ("e", 0.5),
    ("e", 0.0),
]


def test_filter_groups_drops_identical_rewards_and_singletons():
    assert filter_groups(SAMPLES) == (["a", "e"], ["b", "c", "d"])
    assert filter_groups(SAMPLES, atol=0.5) == (["a"], ["b", "c", "d", "e"])  # .5 spread counts as equal
    assert filter_groups([]) == ([], [])


def test_dynamic_sampling_decisions():
    train = dynamic_sampling_decision(SAMPLES, target_groups=1, gen_batches=1)
    assert (train.action, train.keep) == ("train", ["a"])  # truncated to the target
    assert train.metrics["rollout/dyn_kept_frac"] == pytest.approx(2 / 5)
    more = dynamic_sampling_decision(SAMPLES, target_groups=3, gen_batches=1, max_gen_batches=2)
    assert (more.action, more.keep) == ("generate", ["a", "e"])
    stop = dynamic_sampling_decision(SAMPLES, target_groups=3, gen_batches=2, max_gen_batches=2)
    assert stop.action == "abort"
    unlimited = dynamic_sampling_decision(SAMPLES, target_groups=3, gen_batches=99, max_gen_batches=0)
    assert unlimited.action == "generate"
    with pytest.raises(ValueError, match="target_groups"):
        dynamic_sampling_decision(SAMPLES, target_groups=0, gen_batches=1)


@pytest.mark.parametrize(
    "length, expected",
    [
        (100, 0.0),  # far below L_max - L_c
        (16384, 0.0),  # L_max - L_c = 20480 - 4096
        (18432, -0.5),  # midpoint of the buffer
        (20480, -1.0),  # L_max: -f
        (22528, -1.5),  # past L_max: not clamped (as verl)
    ],
)
def test_overlong_penalty_dapo_defaults(length, expected):
    assert overlong_penalty(length) == pytest.approx(expected)


def test_overlong_penalty_factor_and_validation():
    assert overlong_penalty(90, max_length=100, buffer=20, factor=0.5) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(10, max_length=100, buffer=0)


def test_temperature_switch_and_reinforce_selection():
    assert switch_temperature(0.4, 0.5) == 1.2 and switch_temperature(0.5, 0.5) == 0.8
    assert switch_temperature(None, 0.5) == 1.2
    advantages = [0.06, 0.05, -1.0, 1.0, 0.2]  # > .05 strictly: 0, 3, 4
    assert select_reinforce_samples(advantages, entropy=0.5, target=0.5) == [0, 3, 4]  # H <= target: all
    assert select_reinforce_samples(advantages, entropy=0.6, target=0.5) == [0]  # floor(3 / 2)
    assert select_reinforce_samples(advantages, entropy=None, target=0.5, max_samples=2) == [0, 3]
    assert select_reinforce_samples([], entropy=0.1, target=0.5) == []
