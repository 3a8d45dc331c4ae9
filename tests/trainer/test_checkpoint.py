"""Checkpoints (trainer/checkpoint.py) through the real loop: a tiny Llama, real TextWorld games,
real DeepSpeed. A run that dies after step 2 and resumes must play step 3 exactly like the run
that never died (same tasks, same sampled tokens, same loss, same weights); partial checkpoints
are never loaded; a failed save keeps the previous checkpoint.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_checkpoint.py -q   (~1 min)
"""

import errno
import json
from pathlib import Path

import pytest
import torch

import trainer.checkpoint as checkpoint
from trainer.checkpoint import Checkpointer
from trainer.config import load
from trainer.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("loss/policy", "loss/total", "reward/mean", "rollout/gen_tokens", "learner/grad_norm", "learner/lr")


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two steps, nothing after it runs."""


@pytest.fixture
def make_trainer(number_model_dir, game_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    # cpu_tiny + EPO: a controller (entropy history) whose state must survive the restart too
    config = tmp_path / "ckpt.yaml"
    config.write_text(
        f"defaults: [{ROOT / 'configs/debug/cpu_tiny.yaml'}, {ROOT / 'configs/algo/epo.yaml'}]\n"
        "env: {train: {seeds: [1, 3]}}\nrollout: {max_turns: 3}\nalgo: {group_size: 2}\n"
    )
    threads = torch.get_num_threads()

    def make(output_dir: Path, *overrides: str) -> Trainer:
        cfg = load(
            config,
            [
                f"model.name={number_model_dir}",
                f"train.output_dir={output_dir}",
                "train.steps=3",
                "train.tasks_per_step=2",
                "train.save_every=1",
                "train.eval_before=false",
                "train.eval_after=false",
                "train.save_model=false",
                "learner.lr_scheduler=cosine",  # the scheduler position must be restored as well
                "learner.warmup_steps=1",
                "learner.threads=1",
                *overrides,
            ],
        )
        return Trainer(cfg)

    yield make
    torch.set_num_threads(threads)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_before_step(trainer: Trainer, step: int) -> None:
    original, calls = trainer.step, [0]

    def step_or_die():
        calls[0] += 1
        if calls[0] == step - trainer.start_step:
            raise Killed
        return original()

    trainer.step = step_or_die


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.learner.named_weights()}


def test_killed_run_resumes_on_the_same_curve(make_trainer, tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.train()
    expected = records(tmp_path / "straight")
    assert [r["step"] for r in expected] == [1, 2, 3]
    kept = Checkpointer(tmp_path / "straight").complete()
    assert [p.name for p in kept] == ["step_00000002", "step_00000003"]  # keep_checkpoints=2

    crashed = make_trainer(tmp_path / "crashed")
    kill_before_step(crashed, 3)
    with pytest.raises(Killed):
        crashed.train()
    # a save that died half-way, and a folder without its COMPLETE marker: neither may be loaded
    (tmp_path / "crashed/checkpoints/.step_00000003.tmp/deepspeed").mkdir(parents=True)
    (tmp_path / "crashed/checkpoints/step_00000003").mkdir()
    assert Checkpointer(tmp_path / "crashed").latest().name == "step_00000002"

    resumed = make_trainer(tmp_path / "crashed")
    assert resumed.start_step == 2
    assert resumed.sampler.state_dict() == straight_sampler_after(2)
    epo = resumed.learner.controllers
    assert epo and all(c.state_dict() for c in epo.values())  # controller history came back
    resumed.train()
    got = records(tmp_path / "crashed")
    assert [r["step"] for r in got] == [1, 2, 3]  # appended after the first run's records
    for key in COMPARED:
        assert got[2][key] == pytest.approx(expected[2][key], rel=1e-6, abs=1e-9), key
    assert got[0]["learner/lr"] != got[1]["learner/lr"]  # the cosine schedule really moved
    final, reference = weights(resumed), weights(straight)
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6, msg=name)


def straight_sampler_after(steps: int) -> dict:
    from agents.tasks import TaskSampler

    sampler = TaskSampler(list(range(1, 3)), seed=0)
    for _ in range(steps):
        sampler.next(2)
    return sampler.state_dict()


def test_failed_save_keeps_the_previous_checkpoint(make_trainer, tmp_path, monkeypatch):
    run = make_trainer(tmp_path / "full")
    real_save, calls = torch.save, [0]

    def disk_full_at_step_3(obj, path, *args, **kwargs):
        if "step_00000003" in str(path):
            calls[0] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_3)
    run.train()  # the run goes on: a failed checkpoint is logged, not fatal
    assert calls[0] == 1
    left = sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir())
    assert left == ["step_00000001", "step_00000002"]  # no temp folder, previous ones intact
    assert [r["step"] for r in records(tmp_path / "full")] == [1, 2, 3]


def test_loading_an_incomplete_checkpoint_fails_clearly(tmp_path):
    (tmp_path / "checkpoints/step_00000001").mkdir(parents=True)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest() is None
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        ckpt.load(tmp_path / "checkpoints/step_00000001", learner=None)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        Checkpointer(tmp_path, keep_last=0)


def test_repeated_nan_losses_stop_the_run_with_a_checkpoint(make_trainer, tmp_path):
    from trainer.loop import NonFiniteLoss

    # one optimizer step per RL step (the EPO preset takes 2): one skipped update per step
    run = make_trainer(tmp_path / "nan", "train.save_every=0", "train.max_nonfinite_steps=2", "learner.mini_batches=1")
    original = run.learner._token_stats

    def poisoned(*args, **kwargs):
        stats, top_p = original(*args, **kwargs)
        stats.logprobs = stats.logprobs * float("nan")
        return stats, top_p

    run.learner._token_stats = poisoned
    before = weights(run)
    with pytest.raises(NonFiniteLoss, match="2 consecutive steps.*learner.lr"):
        run.train()
    assert [r["learner/nonfinite_steps"] for r in records(tmp_path / "nan")] == [1.0, 1.0]
    assert Checkpointer(tmp_path / "nan").latest().name == "step_00000002"  # saved although save_every=0
    for name, tensor in weights(run).items():
        assert torch.equal(tensor, before[name]), f"{name} changed under NaN losses"


def test_sigkill_mid_run_then_restart_finishes_the_run(number_model_dir, game_cache, tmp_path):
    """A real `entrorl train` process is SIGKILLed as soon as it has logged step 2 (so, usually,
    while it saves step 2's checkpoint); the same command then resumes and finishes. No partial
    checkpoint is loaded; the metrics file keeps every line up to the resumed checkpoint and has
    each step once (the lines of steps played again move to metrics.discarded.jsonl)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "trainer.cli", "train", "configs/debug/cpu_tiny.yaml",
        f"model.name={number_model_dir}", f"train.output_dir={run_dir}", "train.steps=3",
        "train.save_every=1", "train.eval_before=false", "train.eval_after=false", "train.save_model=false",
    ]  # fmt: skip
    env = {**os.environ, "ENTRORL_CACHE": str(game_cache), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, metrics = time.monotonic() + 600, run_dir / "metrics.jsonl"
    # step 2 logged, so (usually) inside its checkpoint: the restart plays step 2 again
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no step 2 within 10 minutes"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = (run_dir / "metrics.jsonl").read_text()
    assert Checkpointer(run_dir).latest() is not None

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    after = (run_dir / "metrics.jsonl").read_text()
    resumed_at = int(done.stderr.split("(step ")[1].split(")")[0])
    kept = "".join(line for line in before.splitlines(True) if json.loads(line)["step"] <= resumed_at)
    assert after.startswith(kept)  # nothing written up to the checkpoint was lost or rewritten
    steps = [json.loads(line)["step"] for line in after.splitlines()]
    assert steps == [1, 2, 3]  # each step exactly once, although a kill mid-save logged one twice
    replayed = before[len(kept) :]  # steps the killed run logged past its checkpoint: kept aside
    discarded = run_dir / "metrics.discarded.jsonl"
    assert (discarded.read_text() if discarded.exists() else "") == replayed
    assert [p.name for p in Checkpointer(run_dir).complete()] == ["step_00000002", "step_00000003"]
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # no temp folder left behind


def test_learner_out_of_memory_stops_with_the_knob_named(make_trainer, tmp_path):
    from trainer.loop import LearnerOutOfMemory

    run = make_trainer(tmp_path / "oom", "train.save_every=0")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    run.learner._token_stats = out_of_memory
    with pytest.raises(LearnerOutOfMemory, match=r"learner.micro_batch_tokens \(now 2048"):
        run.train()


def test_sigterm_stops_after_the_step_with_a_checkpoint(number_model_dir, game_cache, tmp_path):
    """A scheduler's SIGTERM: the step in progress finishes, a checkpoint is written (although
    save_every=0), the process exits 143 saying how to resume, and the same command finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "term"
    cmd = [
        sys.executable, "-m", "trainer.cli", "train", "configs/debug/cpu_tiny.yaml",
        f"model.name={number_model_dir}", f"train.output_dir={run_dir}", "train.steps=3",
        "train.eval_before=false", "train.eval_after=false", "train.save_model=false",
    ]  # fmt: skip
    env = {**os.environ, "ENTRORL_CACHE": str(game_cache), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM: stopped after step" in stderr
    latest = Checkpointer(run_dir).latest()
    stopped_at = int(latest.name.split("_")[1])
    assert stopped_at == len(metrics.read_text().splitlines()) and stopped_at < 3
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
