"""`entrorl plot`: metrics of a resumed run (a step logged twice, a line cut by a kill) read
right, and the PNGs are written."""

import json

from trainer.cli import main
from trainer.plot import read_metrics, series


def write_run(run_dir):
    lines = [
        {"step": 0, "eval/success": 0.2},
        {"step": 1, "reward/mean": 0.1, "entropy/turn_0": 2.0, "time/generate": 3.0, "time/update": 1.0},
        {"step": 2, "reward/mean": 0.9, "entropy/turn_0": 1.0},  # logged, then the run was killed
        {"step": 2, "reward/mean": 0.3, "entropy/turn_0": 1.5, "entropy/turn_1": 1.2},  # after the resume
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 3, "reward/me'  # torn last line
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(text)


def test_last_record_of_a_step_wins_and_torn_lines_are_skipped(tmp_path):
    write_run(tmp_path / "run")
    steps = read_metrics(tmp_path / "run/metrics.jsonl")
    assert list(steps) == [0, 1, 2]
    assert steps[2] == {"reward/mean": 0.3, "entropy/turn_0": 1.5, "entropy/turn_1": 1.2}
    lines = series(steps, [r"entropy/turn_\d+", "reward/mean"])
    assert list(lines) == ["entropy/turn_0", "entropy/turn_1", "reward/mean"]
    assert lines["entropy/turn_0"] == ([1, 2], [2.0, 1.5]) and lines["entropy/turn_1"] == ([2], [1.2])


def test_plot_cli_writes_pngs(tmp_path, capsys):
    write_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 0
    written = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert {"reward.png", "entropy.png", "step_time.png"} <= names
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_plot_compare_draws_a_line_per_run(tmp_path, capsys):
    import matplotlib.image

    from trainer.plot import plot_compare

    for name, success in (("grpo", [0.1, 0.3]), ("epo", [0.2, 0.4, 0.5])):
        (tmp_path / name).mkdir()
        records = [{"step": i + 1, "rollout/success": v} for i, v in enumerate(success)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    written = plot_compare([tmp_path / "grpo", tmp_path / "epo"], tmp_path / "cmp")
    assert [p.name for p in written] == ["success.png"]  # no run logged entropy or invalid replies
    assert matplotlib.image.imread(written[0]).shape[2] in (3, 4)
    assert main(["plot", str(tmp_path / "grpo"), str(tmp_path / "epo")]) == 2  # needs --out
    assert "needs --out" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "grpo"), str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.logging import RunLogger

    logger = RunLogger(tmp_path, tensorboard=True)
    logger.log(1, {"reward/mean": 0.25, "rollout/success": 0.5, "flag": True})
    logger.log(2, {"reward/mean": 0.75})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.75)]
    assert "flag" not in events.Tags()["scalars"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # JSONL as always
