"""Real faults at each phase of a run lose nothing: a full disk (a real, small tmpfs filled
with ballast at the chosen moment) at a checkpoint, at the export and at a metrics write, and
a real SIGTERM (the process signals itself) during the evaluations, a checkpoint and the export.
Each time the run keeps its newest complete checkpoint, says what happened and the fix, and the
restart finishes with a history that has each step once.

Needs root for the tmpfs (CI and the dev machines run as root); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.trainer.test_checkpoint import make_trainer, records  # noqa: F401  (fixture)
from trainer.checkpoint import Checkpointer
from trainer.logging import RunLogger


class SmallDisk:
    """A tmpfs of `size_mb` MB; `fill()` takes all its free space, `free()` gives it back."""

    def __init__(self, root: Path, size_mb: int):
        self.root = root
        root.mkdir(parents=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.ballast = root / "ballast"

    def fill(self) -> None:
        with open(self.ballast, "ab", buffering=0) as f:  # unbuffered: the close has nothing to flush
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
            except OSError:
                pass

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path):
    small = SmallDisk(tmp_path / "disk", 256)
    yield small
    small.unmount()


def test_a_metrics_write_on_a_full_disk_keeps_the_record_for_the_next_write(disk, capsys):
    logger = RunLogger(disk.root / "run")
    logger.log(1, {"a": 1.0})
    disk.fill()
    logger.log(2, {"a": 2.0, "long": "x" * 100_000})  # cannot fit: nothing of it may stay
    assert [r["step"] for r in records(disk.root / "run")] == [1]
    assert "disk is full" in capsys.readouterr().err
    disk.free()
    logger.log(3, {"a": 3.0})
    assert [r["step"] for r in records(disk.root / "run")] == [1, 2, 3]


def test_a_cut_last_line_is_dropped_when_the_run_restarts(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "a": 0.')  # killed mid-write
    RunLogger(tmp_path).log(2, {"a": 0.5})
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_says_so(make_trainer, disk, capsys):  # noqa: F811
    run = make_trainer(disk.root / "run")
    real_save = run.checkpointer.save

    def save(step, *args, **kwargs):
        if step != 3:
            return real_save(step, *args, **kwargs)
        disk.fill()  # the kernel's ENOSPC inside torch.save: a RuntimeError, not an OSError
        try:
            return real_save(step, *args, **kwargs)
        finally:
            disk.free()

    run.checkpointer.save = save
    run.train()  # the run goes on
    err = capsys.readouterr().err
    assert "checkpoint at step 3 failed" in err and "step_00000002, is kept" in err and "full disk" in err
    assert [p.name for p in Checkpointer(disk.root / "run").complete()] == ["step_00000001", "step_00000002"]
    assert not list((disk.root / "run/checkpoints").glob(".step_*"))
    assert [r["step"] for r in records(disk.root / "run")] == [1, 2, 3]


def test_a_full_disk_at_the_export_says_how_to_finish_and_the_restart_does(make_trainer, disk):  # noqa: F811
    from trainer.loop import ExportFailed

    out = disk.root / "run"
    run = make_trainer(out, "train.save_model=true")
    real_export = run._export

    def export(folder):
        disk.fill()
        return real_export(folder)

    run._export = export
    with pytest.raises(ExportFailed, match=r"(?i)full.*resumes from .*step_00000003 and writes the model"):
        run.train()
    assert not (out / "model").exists() and not (out / ".model.tmp").exists()
    assert not (out / "summary.json").exists()  # not finished
    disk.free()
    again = make_trainer(out, "train.save_model=true")
    assert again.start_step == 3
    summary = again.train()
    assert (out / "model/config.json").is_file() and json.loads((out / "summary.json").read_text()) == summary
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def _sigterm_during(obj, name: str):
    """Wrap obj.name so that the process gets a real SIGTERM as the phase starts."""
    real = getattr(obj, name)

    def phase(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    setattr(obj, name, phase)


@pytest.mark.parametrize("phase", ["first_eval", "checkpoint", "final_eval", "export"])
def test_sigterm_in_any_phase_stops_cleanly_and_the_restart_finishes(make_trainer, tmp_path, phase):  # noqa: F811
    from trainer.loop import Preempted

    out = tmp_path / phase
    overrides = ("train.eval_before=true", "train.eval_after=true", "train.save_model=true", "train.save_every=0",
                 "env.eval.seeds=[100000,100002]")  # fmt: skip
    run = make_trainer(out, *overrides)
    evals = iter([phase == "first_eval", phase == "final_eval"])
    real_evaluate = run.evaluate

    def evaluate(step):
        if next(evals):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(step)

    run.evaluate = evaluate
    if phase == "checkpoint":  # save_every=0: the only checkpoint is a forced one; make step 2 save
        run.cfg.train.save_every = 2
        _sigterm_during(run.checkpointer, "save")
    if phase == "export":
        _sigterm_during(run, "_export")
        summary = run.train()  # the last phase finishes: the run is complete
        assert (out / "model/config.json").is_file() and "eval/success_before" in summary
        return
    with pytest.raises(Preempted, match="SIGTERM"):
        run.train()
    latest = Checkpointer(out).latest()
    again = make_trainer(out, *overrides)
    assert again.start_step == (0 if latest is None else int(latest.name.split("_")[1]))
    summary = again.train()
    assert {"eval/success_before", "eval/success_after", "train/steps"} <= set(summary)
    assert (out / "model/config.json").is_file()
    steps = [r["step"] for r in records(out)]
    evals_logged = [r["step"] for r in records(out) if "eval/success" in r]
    assert [s for s in steps if s] == sorted(set(s for s in steps if s)) or steps.count(3) == 2, steps
    assert evals_logged == [0, 3], evals_logged  # each evaluation once
    assert [r["step"] for r in records(out) if "loss/policy" in r] == [1, 2, 3]
