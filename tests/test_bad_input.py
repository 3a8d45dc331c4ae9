"""Bad config values fail before anything loads: exit code 2 and a message naming the key and
the fix (the CLI, in process; the Trainer must never be built)."""

from __future__ import annotations

import pytest


@pytest.fixture
def cli(monkeypatch):
    import trainer.loop
    from trainer import cli

    def must_not_build(*args, **kwargs):
        raise AssertionError("the Trainer (model, DeepSpeed) was built despite the bad input")

    monkeypatch.setattr(trainer.loop, "Trainer", must_not_build)
    return cli


@pytest.mark.parametrize(
    "override, says",
    [
        ("train.steps=-1", "train.steps=-1: RL steps to run, >= 1"),
        ("train.steps=0", "train.steps=0"),
        ("rollout.max_turns=0", "rollout.max_turns=0"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0"),
        ("env.train.seeds=[5,5]", "env.train.seeds=[5, 5]: a non-empty"),
        ("env.eval.seeds=[9,3]", "env.eval.seeds=[9, 3]"),
        ("model.name=/no/such/model", "model.name=/no/such/model: no such folder"),
        ("model.name=runs/a/model", "model.name=runs/a/model: no such folder"),
        ("rollout.engine=sglang", "rollout.engine='sglang'"),
        ("sft.source=", """`sft.source=` is null on the command line: write 'sft.source=""'"""),
    ],
)
def test_bad_values_exit_2_naming_the_key(cli, capsys, override, says):
    assert cli.main(["train", "configs/debug/cpu_tiny.yaml", override]) == 2
    assert says in capsys.readouterr().err


def test_a_yaml_syntax_error_names_the_file_and_line(cli, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not valid YAML" in err and "line 3" in err


def test_a_hub_id_is_left_for_the_loader(cli):
    """org/name may be a hub id: the preflight does not reject it (the loader says more)."""
    from trainer.cli import _check_model_path

    _check_model_path("Qwen/Qwen2.5-0.5B-Instruct")
    _check_model_path("smollm2-135m-instruct")


def test_a_misspelt_env_kwarg_is_named_at_startup(cli, capsys):
    """Inside the env workers it would end every episode with env_error: eval printed 0.0."""
    for command in ("train", "eval"):
        assert cli.main([command, "configs/debug/cpu_tiny.yaml", "env.kwargs.max_stepz=5"]) == 2
        err = capsys.readouterr().err
        assert "env.kwargs.max_stepz: not an argument of the 'textworld' env" in err and "max_steps" in err


def test_env_kwargs_check_accepts_the_real_arguments():
    from environments.base import check_kwargs

    check_kwargs("textworld", {"max_steps": 5})
    check_kwargs("math", {})
    with pytest.raises(KeyError, match="unknown env id 'nope'"):
        check_kwargs("nope", {})


def test_step_mode_branching_needs_tree_credit():
    from trainer.config import ConfigError, load

    branched = ["rollout.mode=step", "rollout.branch.policy=arpo"]
    with pytest.raises(ConfigError, match="algo.advantage.name=grpo_tree.*or rollout.mode=trajectory"):
        load(None, branched)  # grpo: the shared turns would get the parent's return alone
    load(None, [*branched, "algo.advantage.name=grpo_tree"])
    load(None, ["rollout.mode=trajectory", "rollout.branch.policy=arpo"])


def test_a_finished_run_started_again_says_so_and_trains_nothing(cli, capsys, tmp_path):
    (tmp_path / "summary.json").write_text('{"eval/success_after": 0.5, "train/steps": 2.0}')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert cli.main(["train", "configs/debug/cpu_tiny.yaml", f"train.output_dir={tmp_path}"]) == 0
    out, err = capsys.readouterr()
    assert "holds a finished run" in err and "train.resume=never" in err
    assert out.strip().splitlines()[-1] == '{"eval/success_after": 0.5, "train/steps": 2.0}'
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'  # no second history
