"""End to end on CPU: `entrorl train configs/debug/cpu_tiny.yaml` with a tiny random Llama and
real generated TextWorld games (2 steps of 2 tasks x group 2, eval on 2 games before and after).

A purely random model never parses a command, so every episode gets the same reward and every
advantage is 0: the learner would skip everything. The model here is nudged (a few steps on
random text) to put about half its probability on the digits 1-4, so replies sometimes pick a
valid command, groups see different rewards, and the update really runs.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_e2e.py -q   (~30 s)
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/debug/cpu_tiny.yaml"


def test_train_cpu_tiny(number_model_dir, game_cache, tmp_path, monkeypatch, capsys):
    from trainer.cli import main

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))  # games are generated once per machine
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    try:
        code = main(
            ["train", CONFIG, f"model.name={number_model_dir}", f"train.output_dir={tmp_path}", "train.save_rollouts=true"]
        )
    finally:
        torch.set_num_threads(threads)  # the config asks for 1 thread; give the suite back its own
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("eval/success_before", "eval/success_after"):
        assert 0.0 <= summary[key] <= 1.0, summary
    assert summary["train/steps"] == 2.0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "config.yaml").exists()
    assert (tmp_path / "model" / "model.safetensors").exists()  # the trained policy, loadable by eval

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "rollout/success" in r]
    assert [r["step"] for r in train] == [1, 2]  # one record per train step
    for record in train:
        for key in ("rollout/success", "reward/mean", "time/step", "time/rollout", "learner/optimizer_steps"):
            assert key in record, f"{key} missing from step {record['step']}: {sorted(record)}"
        assert record["rollout/episodes"] == 4.0  # 2 tasks x group 2
        assert 0.0 <= record["rollout/success"] <= 1.0
    trained = [r for r in train if r["learner/optimizer_steps"] >= 1]
    assert trained, "no step had a non-zero advantage: the learner never ran"
    for record in trained:
        assert "loss/policy" in record and record["learner/grad_norm"] > 0
    evals = [r for r in records if "eval/success" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval/episodes"] == 2.0 for r in evals)

    # the saved rollouts, shown token by token: sampled replies and masked env turns
    saved = tmp_path / "rollouts" / "step_000002_rank0.jsonl"
    assert len(saved.read_text().splitlines()) == 4  # 2 tasks x group 2, one sample per episode
    assert main(["show-trajectory", str(saved), "--index", "0"]) == 0
    shown = capsys.readouterr().out
    assert "SAMPLED [0:" in shown and "mean entropy" in shown and "prompt (" in shown
    if json.loads(saved.read_text().splitlines()[0])["info"]["turns"] > 1:
        assert "env/template [" in shown  # the env's reply between two turns, loss_mask 0
    assert main(["show-trajectory", str(saved), "--index", "9"]) == 2


def test_eval_cli_reports_success(number_model_dir, game_cache, tmp_path, monkeypatch, capsys):
    """`entrorl eval` plays the eval games with the given model, no learner, and ends with JSON."""
    from trainer.cli import main

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    try:
        code = main(["eval", CONFIG, f"model.name={number_model_dir}", f"train.output_dir={tmp_path}"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"eval/success", "eval/infra_failures"} and 0.0 <= summary["eval/success"] <= 1.0
    assert summary["eval/infra_failures"] == 0.0  # episodes ended by an env/engine fault, said apart
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["eval/episodes"] == 2.0  # seeds [1, 3), one episode each


def test_cli_rejects_a_bad_key_before_loading_anything():
    entrorl = ROOT / ".venv" / "bin" / "entrorl"
    if not entrorl.exists():
        pytest.skip("console script not installed in .venv")
    out = subprocess.run(
        [str(entrorl), "train", CONFIG, "learner.bogus=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "learner.bogus" in out.stderr


PRESETS = sorted(p.name for p in (ROOT / "configs" / "algo").glob("*.yaml"))


@pytest.mark.parametrize("preset", [*PRESETS, "grpo.yaml+lora"])
def test_every_algo_preset_trains_one_step(preset, number_model_dir, game_cache, tmp_path, monkeypatch, capsys):
    """Each preset in configs/algo runs a real step (rollout -> its advantages -> its losses and
    regularisers -> DeepSpeed update) on the tiny model: wiring errors surface here, not on a GPU."""
    from trainer.cli import main

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    monkeypatch.chdir(ROOT)
    overrides = [
        f"model.name={number_model_dir}",
        f"train.output_dir={tmp_path}",
        "env.train.seeds=[1,3]",
        "rollout.max_turns=3",
        "algo.group_size=2",
        "train.steps=1",
        "train.tasks_per_step=2",
        "train.eval_before=false",
        "train.eval_after=false",
        "train.save_model=false",
        "learner.threads=1",
    ]
    if preset.endswith("+lora"):  # LoRA adapters, merged weights synced into the engine
        preset, overrides = preset.removesuffix("+lora"), [*overrides, "model.lora.rank=4"]
    threads = torch.get_num_threads()
    try:
        assert main(["train", f"configs/algo/{preset}", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["rollout/episodes"] >= 4.0
    assert all(v == v for v in record.values() if isinstance(v, float)), "NaN in metrics"


def test_math_rlvr_end_to_end(number_model_dir, tmp_path, monkeypatch, capsys):
    """The math recipe through the same trainer: arithmetic problems, boxed format with few-shot
    examples, math-verify reward, a DeepSpeed step and a greedy eval with its interval."""
    from trainer.cli import main

    monkeypatch.chdir(ROOT)
    overrides = [
        f"model.name={number_model_dir}",
        f"train.output_dir={tmp_path}",
        "train.steps=1",
        "train.tasks_per_step=2",
        "algo.group_size=2",
        "env.eval.seeds=[100000,100004]",
        "rollout.max_new_tokens=8",
        "learner.threads=1",
        "train.save_model=false",
    ]
    threads = torch.get_num_threads()
    try:
        assert main(["train", "configs/math/arith_cpu.yaml", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train/steps"] == 1.0 and 0.0 <= summary["eval/success_after"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "rollout/episodes" in r]
    assert train[0]["rollout/episodes"] == 4.0 and train[0]["rollout/turns"] == 1.0  # single-turn
    evals = [r for r in records if "eval/success" in r]
    assert all(r["eval/episodes"] == 4.0 and r["eval/success_lo"] <= r["eval/success"] <= r["eval/success_hi"] for r in evals)
