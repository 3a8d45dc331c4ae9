"""Every YAML under configs/ loads and validates; bad configs fail naming the key to change.

A file holds deltas over the dataclass defaults (trainer/config.py), so partial presets such as
configs/algo/*.yaml load the same way. Loading covers unknown keys and types (OmegaConf) and the
cross-field checks of `finalize`; the names and params of the registered loss, advantage and
aggregation are checked against their registries here, as the learner would at build time.

Run: .venv/bin/python -m pytest tests/test_configs.py -q
"""

from pathlib import Path

import pytest

from trainer.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.yml"))


def test_there_are_configs():
    assert ROOT / "configs" / "quickstart.yaml" in CONFIGS
    assert ROOT / "configs" / "debug" / "cpu_tiny.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_loads_and_names_registered_parts(path):
    from trainer.advantages import ADVANTAGES
    from trainer.aggregation import AGGREGATIONS
    from trainer.losses import POLICY_LOSSES

    cfg = load(path)
    POLICY_LOSSES.build(cfg.algo.loss.name, cfg.algo.loss.params)
    ADVANTAGES.build(cfg.algo.advantage.name, cfg.algo.advantage.params)
    assert cfg.algo.aggregation.mode in AGGREGATIONS, f"unknown aggregation {cfg.algo.aggregation.mode!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_opens_with_a_header_comment(path):
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: start with a comment saying what it is for and how to run it"


def test_overrides_beat_the_file_and_the_file_beats_defaults():
    default = load(None)
    tiny = load(ROOT / "configs" / "debug" / "cpu_tiny.yaml")
    assert tiny.train.steps != default.train.steps
    assert load(ROOT / "configs" / "debug" / "cpu_tiny.yaml", ["train.steps=5"]).train.steps == 5


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.bogus=1", "learner.bogus"),  # unknown key in a section
        ("bogus=1", "bogus"),  # unknown section
        ("learner.lr=fast", "learner.lr"),  # wrong type
        ("train.steps=1.5", "train.steps"),
        ("learner.packing=maybe", "learner.packing"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        load(None, [override])


def test_bad_key_in_a_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("# a typo\nlearner:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"learner\.lrr"):
        load(path)


def test_inconsistent_sizes_name_both_keys():
    with pytest.raises(ConfigError) as info:
        load(None, ["train.tasks_per_step=3", "learner.mini_batches=2"])
    assert "train.tasks_per_step" in str(info.value) and "learner.mini_batches" in str(info.value)


def test_sampling_and_learner_temperature_must_agree():
    with pytest.raises(ConfigError, match="learner.temperature"):
        load(None, ["sampling.temperature=0.7"])
    assert load(None, ["sampling.temperature=0.7", "learner.temperature=0.7"]).learner.temperature == 0.7
