"""Every YAML under configs/ loads and validates; bad configs fail naming the key to change.

A file holds deltas over the dataclass defaults (trainer/config.py), so partial presets such as
configs/algo/*.yaml load the same way, and may build on other files (`defaults: [...]`). Loading covers unknown keys and types (OmegaConf) and the
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
    from trainer.losses import POLICY_LOSSES, TOKEN_WEIGHTS
    from trainer.regularizers import REGULARIZERS

    cfg = load(path)
    POLICY_LOSSES.build(cfg.algo.loss.name, cfg.algo.loss.params)
    ADVANTAGES.build(cfg.algo.advantage.name, cfg.algo.advantage.params)
    for reg in cfg.algo.regularizers:
        REGULARIZERS.build(reg.name, reg.params)
    if cfg.algo.token_weights.name:
        TOKEN_WEIGHTS.build(cfg.algo.token_weights.name, cfg.algo.token_weights.params)
    assert cfg.algo.aggregation.mode in AGGREGATIONS, f"unknown aggregation {cfg.algo.aggregation.mode!r}"


ALGO_PRESETS = (
    "grpo dr_grpo dapo rloo reinforce_pp gspo ppo gigpo clip_cov kl_cov forking_tokens_80_20 aent epo aepo empg"
).split()


def test_every_algorithm_has_a_preset_that_only_sets_algo_learner_and_critic():
    from omegaconf import OmegaConf

    for name in ALGO_PRESETS:
        path = ROOT / "configs" / "algo" / f"{name}.yaml"
        assert path.is_file(), f"missing preset {path.name}"
        text = path.read_text()
        assert "arXiv" in text and "entrorl train" in text, (
            f"{path.name}: header needs the paper and the command"
        )
        assert set(OmegaConf.load(path)) <= {"defaults", "algo", "learner", "critic"}, path.name


def test_unknown_parts_fail_listing_the_valid_names():
    with pytest.raises(ConfigError, match=r"algo\.regularizers\[0\].*entropy_bonus, epo"):
        load(None, ["algo.regularizers=[{name: entropy_bonu}]"])
    with pytest.raises(ConfigError, match=r"algo\.regularizers\[0\].*valid params: coef"):
        load(None, ["algo.regularizers=[{name: kl, params: {cof: 1.0}}]"])
    with pytest.raises(ConfigError, match=r"algo\.token_weights.*steer"):
        load(None, ["algo.token_weights.name=ster"])
    with pytest.raises(ConfigError, match=r"algo\.loss.*ppo_clip"):
        load(None, ["algo.loss.name=ppo"])
    with pytest.raises(ConfigError, match="algo.stats_scope"):
        load(None, ["algo.stats_scope=mini_batch"])
    with pytest.raises(ConfigError, match="algo.forking_tokens"):
        load(None, ["algo.forking_tokens=20"])


def test_auto_aggregation_follows_the_loss_flag():
    assert load(None).algo.aggregation.mode == "token-mean"
    assert load(None, ["algo.loss.name=gspo"]).algo.aggregation.mode == "seq-mean-token-mean"
    explicit = ["algo.loss.name=gspo", "algo.aggregation.mode=token-mean"]
    assert load(None, explicit).algo.aggregation.mode == "token-mean"


def test_defaults_compose_files_in_order(tmp_path):
    preset = load(ROOT / "configs" / "algo" / "forking_tokens_80_20.yaml")
    assert preset.algo.forking_tokens == 0.2
    assert preset.algo.loss.params["clip_high"] == 0.28  # from dapo.yaml, its `defaults`

    experiment = tmp_path / "experiments" / "x.yaml"
    experiment.parent.mkdir()
    (tmp_path / "base.yaml").write_text("# base\ntrain: {steps: 3, tasks_per_step: 2}\n")
    algo = (ROOT / "configs" / "algo" / "epo.yaml").as_posix()
    experiment.write_text(f"# x\ndefaults: [../base.yaml, {algo}]\ntrain: {{steps: 5}}\n")
    cfg = load(experiment, ["algo.group_size=2"])
    assert (cfg.train.steps, cfg.train.tasks_per_step, cfg.algo.group_size) == (5, 2, 2)
    assert [r.name for r in cfg.algo.regularizers] == ["epo", "kl"]


def test_a_layer_naming_another_estimator_replaces_its_params(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("# base\nalgo: {advantage: {name: grpo, params: {norm_by_std: false}}}\n")
    gigpo = (ROOT / "configs" / "algo" / "gigpo.yaml").as_posix()
    (tmp_path / "x.yaml").write_text(f"# x\ndefaults: [base.yaml, {gigpo}]\n")
    # a plain merge would hand gigpo grpo's norm_by_std and fail on it
    assert load(tmp_path / "x.yaml").algo.advantage.params == {"step_weight": 1.0, "gamma": 0.95, "mode": "mean_norm"}
    # the same name keeps merging: an override edits one param of the base's
    assert load(base, ["algo.advantage.params.eps=0.1"]).algo.advantage.params == {"norm_by_std": False, "eps": 0.1}
    renamed = load(base, ["algo.advantage.name=rloo"]).algo.advantage
    assert (renamed.name, renamed.params) == ("rloo", {})


def test_defaults_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("defaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load(tmp_path / "c.yaml")


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


def test_world_size_checks_name_the_keys_and_sizes_are_described():
    from trainer.config import check_world, describe_sizes

    cfg = load(None, ["train.tasks_per_step=12", "learner.mini_batches=2", "algo.group_size=8"])
    with pytest.raises(ConfigError, match=r"train.tasks_per_step=12 is not a multiple of the 8 ranks.*\(e.g. 8\)"):
        check_world(cfg, 8)
    with pytest.raises(ConfigError, match=r"3 task groups per rank.*learner.mini_batches=2"):
        check_world(cfg, 4)
    check_world(cfg, 2)  # 6 groups per rank, 3 per mini-batch
    text = describe_sizes(cfg, 2)
    assert "12 (6 per rank) x group 8 = 96 episodes/step (48 per rank" in text
    assert "2 x epochs 1 = 16 optimizer steps over 8 RL steps" in text


def test_task_level_layers_env_set_data_dir_and_split():
    from trainer.config import task_level

    cfg = load(None, ["env.level.split=train", "env.eval.level.split=valid_seen", "env.data_dir=/data/alfworld"])
    assert task_level(cfg.env, cfg.env.train) == {"split": "train", "data_dir": "/data/alfworld"}
    assert task_level(cfg.env, cfg.env.eval) == {"split": "valid_seen", "data_dir": "/data/alfworld"}
    cfg = load(None, ["env.eval.level.split=valid_seen", "env.split=valid_unseen"])
    assert task_level(cfg.env, cfg.env.eval)["split"] == "valid_unseen"


@pytest.mark.parametrize(
    ("name", "ranks"),
    [("alfworld_grpo_epo_1x", 1), ("alfworld_grpo_epo_8x", 8), ("math_dapo_2x8", 16)],
)
def test_gpu_presets_divide_over_their_ranks(name, ranks):
    from trainer.config import check_world, describe_sizes

    cfg = load(ROOT / "configs" / "gpu" / f"{name}.yaml")
    check_world(cfg, ranks)  # raises naming the keys when groups would not split evenly
    assert f"ranks {ranks}" in describe_sizes(cfg, ranks)
