"""`entrorl plot RUN_DIR`: PNG curves from a run's metrics.jsonl; `entrorl plot RUN_A RUN_B ...`:
one figure per compared metric with a line per run.

The metrics file is append-only, so a resumed run may hold a step twice (logged before the kill,
then again after the resume): the last record of each step wins, as it is the one the resumed
curve continued from. Train and eval records share step numbers but not keys, so they are
merged per step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

# One figure per entry: (file name, title, metric names or regexes, y label)
PANELS: list[tuple[str, str, list[str], str]] = [
    ("reward.png", "Reward and success", ["reward/mean", "rollout/success", "eval/success"], "value"),
    ("entropy.png", "Entropy (nats/token)", ["entropy/rollout_mean", r"entropy/turn_\d+"], "nats"),
    ("entropy_by_role.png", "Entropy by token role", [r"entropy/role/.+"], "nats"),
    ("kl.png", "KL to the rollout / reference policy", [r"loss/approx_kl.*", r"loss/kl.*"], "nats"),
    ("clipping.png", "Clip fractions", [r"loss/clipfrac.*", "loss/selected_frac"], "fraction"),
    (
        "loss.png",
        "Loss terms",
        ["loss/total", "loss/policy", r"loss/(?!approx_kl|clipfrac|ratio|kl).+"],
        "loss",
    ),
    ("throughput.png", "Learner throughput", ["learner/tokens_per_s"], "tokens/s"),
]
# Compared across runs: (file name, title, metric, y label)
COMPARED: list[tuple[str, str, str, str]] = [
    ("success.png", "Training-rollout success", "rollout/success", "success rate"),
    ("score.png", "Training-rollout env score", "rollout/score", "score"),
    ("entropy.png", "Rollout entropy (nats/token)", "entropy/rollout_mean", "nats"),
    ("invalid.png", "Unparsable replies", "rollout/invalid_rate", "fraction"),
]
TIME_PARTS = ["time/generate", "time/env", "time/advantage", "time/update", "time/sync"]


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """{step: merged record}; later records of a step override earlier ones key by key."""
    steps: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write: skip it, keep the rest
            continue
        steps.setdefault(int(record.pop("step")), {}).update(record)
    return dict(sorted(steps.items()))


def series(steps: dict[int, dict[str, float]], patterns: Iterable[str]) -> dict[str, tuple[list, list]]:
    """Metric name -> (x, y) for every name matching one of `patterns` (exact name or regex)."""
    names = sorted({k for record in steps.values() for k in record})
    chosen: list[str] = []
    for pattern in patterns:
        regex = re.compile(f"^{pattern}$")
        chosen += [n for n in names if regex.match(n) and n not in chosen]
    return {
        name: ([s for s, r in steps.items() if name in r], [r[name] for r in steps.values() if name in r])
        for name in chosen
    }


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs of `run_dir` (default into `<run_dir>/plots`); return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: pass a run directory written by `entrorl train`")
    steps = read_metrics(metrics)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, title, patterns, ylabel in PANELS:
        lines = series(steps, patterns)
        if not lines:
            continue
        _line_figure(lines, title, ylabel, out / filename)
        written.append(out / filename)
    parts = series(steps, TIME_PARTS)
    if parts:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = sorted({s for xs, _ in parts.values() for s in xs})
        bottom = [0.0] * len(x)
        for name, (xs, ys) in parts.items():
            by_step = dict(zip(xs, ys, strict=True))
            heights = [by_step.get(s, 0.0) for s in x]
            ax.bar(x, heights, bottom=bottom, label=name.removeprefix("time/"))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        _finish(fig, ax, "Step time breakdown", "seconds", out / "step_time.png")
        written.append(out / "step_time.png")
    return written


def plot_compare(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write one PNG per COMPARED metric into `out_dir`, a line per run (labelled by its folder
    name); a metric no run logged is skipped. Return the paths."""
    runs = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "metrics.jsonl").is_file():
            raise FileNotFoundError(
                f"{run_dir / 'metrics.jsonl'} not found: pass run directories written by `entrorl train`"
            )
        runs[run_dir.name] = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, title, metric, ylabel in COMPARED:
        lines = {name: series(steps, [re.escape(metric)]).get(metric) for name, steps in runs.items()}
        lines = {name: line for name, line in lines.items() if line}
        if not lines:
            continue
        _line_figure(lines, title, ylabel, out / filename)
        written.append(out / filename)
    return written


def _line_figure(lines: dict[str, tuple[list, list]], title: str, ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (x, y) in lines.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=name)
    _finish(fig, ax, title, ylabel, path)


def _finish(fig, ax, title: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
