"""The floor a learning curve has to clear: uniformly random valid actions on a config's eval set.

Plays every eval task of `--config` (env.eval: its seeds, level and samples_per_task; the env's
kwargs and rollout.max_turns) with a uniformly random command from `info["admissible_commands"]`
each turn, and prints success and score (the sum of env rewards) as the trainer's eval reports
them, with the Wilson 95 % interval on success. The env must list its valid actions
(`admissible_commands: true`, as in the numbered-command configs).

  .venv/bin/python scripts/random_baseline.py --config configs/experiments/scienceworld_cpu_grpo.yaml
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.tasks import materialise  # noqa: E402
from environments import make  # noqa: E402
from trainer.config import load, task_level  # noqa: E402
from trainer.evaluation import wilson_interval  # noqa: E402


def play(env, options: dict, max_turns: int, rng: random.Random) -> tuple[bool, float]:
    """One episode of random valid actions: (won, summed reward)."""
    _, info = env.reset(options=options)
    total = 0.0
    for _ in range(max_turns):
        commands = info.get("admissible_commands")
        if not commands:
            raise SystemExit("the env lists no admissible_commands: set env.kwargs.admissible_commands=true")
        _, reward, terminated, truncated, info = env.step(rng.choice(commands))
        total += reward
        if terminated or truncated:
            break
    return bool(info.get("won")), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()

    cfg = load(args.config, args.overrides)
    tasks = materialise(cfg.env.id, list(range(*cfg.env.eval.seeds)), task_level(cfg.env, cfg.env.eval))
    env = make(cfg.env.id, **cfg.env.kwargs)
    rng = random.Random(args.seed)
    by_task: dict[str, list[tuple[bool, float]]] = defaultdict(list)
    for options in tasks:
        key = str(options.get("task_name") or options.get("task_type") or "all")
        for _ in range(cfg.env.eval.samples_per_task):
            by_task[key].append(play(env, options, cfg.rollout.max_turns, rng))
    env.close()

    results = [r for rows in by_task.values() for r in rows]
    wins = sum(won for won, _ in results)
    low, high = wilson_interval(wins, len(results))
    print(f"random valid actions, {len(results)} episodes of up to {cfg.rollout.max_turns} turns")
    print(f"success {wins / len(results):.3f} [{low:.3f}, {high:.3f}]  score {mean(results):.3f}")
    for key, rows in sorted(by_task.items()):
        print(f"  {key}: success {sum(w for w, _ in rows) / len(rows):.3f}  score {mean(rows):.3f}")


def mean(results: list[tuple[bool, float]]) -> float:
    return sum(score for _, score in results) / len(results)


if __name__ == "__main__":
    main()
