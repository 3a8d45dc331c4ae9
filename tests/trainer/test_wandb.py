"""Weights & Biases logging (train.wandb). The `wandb` package is not installed here and its
service cannot be reached, so a stand-in module (named as such) records what RunLogger asks of
it: the init arguments, a run id kept across a resume, each step's metrics, the finish."""

import sys
import types

import pytest

from trainer.config import ConfigError, WandbConfig, load
from trainer.logging import RunLogger


class StandInRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished = True


@pytest.fixture
def stand_in_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []
    module.util = types.SimpleNamespace(generate_id=lambda: f"id{len(module.runs)}")

    def init(**kwargs):
        module.runs.append(StandInRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_metrics_go_to_wandb_and_a_resume_continues_the_run(stand_in_wandb, tmp_path):
    cfg = WandbConfig(project="entrorl-test", mode="offline", tags=["cpu"])
    logger = RunLogger(tmp_path, wandb=cfg, config={"algo": {"group_size": 4}})
    logger.log(1, {"reward/mean": 0.5})
    logger.close()
    run = stand_in_wandb.runs[0]
    assert run.init_kwargs["project"] == "entrorl-test" and run.init_kwargs["mode"] == "offline"
    assert run.init_kwargs["name"] == tmp_path.name and run.init_kwargs["config"] == {
        "algo": {"group_size": 4}
    }
    assert run.init_kwargs["resume"] == "allow" and run.init_kwargs["tags"] == ["cpu"]
    assert run.logged == [(1, {"reward/mean": 0.5})] and run.finished
    RunLogger(tmp_path, wandb=cfg)  # the resumed run: same id, read back from the run folder
    assert stand_in_wandb.runs[1].init_kwargs["id"] == run.init_kwargs["id"] == "id0"


def test_wandb_off_by_default_and_on_other_ranks(stand_in_wandb, tmp_path):
    RunLogger(tmp_path, wandb=WandbConfig())  # no project
    RunLogger(tmp_path / "r1", enabled=False, wandb=WandbConfig(project="p"))  # not rank 0
    assert stand_in_wandb.runs == []


def test_missing_package_and_bad_mode_name_the_key(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(RuntimeError, match="train.wandb.project='p'.*pip install wandb"):
        RunLogger(tmp_path, wandb=WandbConfig(project="p"))
    with pytest.raises(ConfigError, match="train.wandb.mode='cloud'"):
        load(None, ["train.wandb.mode=cloud"])
