"""Environment speed: reset and step times of one TextWorld env with and without admissible
commands, then env steps/s through the env pool for 0 (in-process), 1 and N workers.

Run from the repo root:
    .venv/bin/python scripts/bench_envs.py                          # textworld W1 O3 Q1, workers 0 1 2
    .venv/bin/python scripts/bench_envs.py --no-single               # the pool only
    .venv/bin/python scripts/bench_envs.py --workers 0 1 2 4 --envs 8 --steps 800
    .venv/bin/python scripts/bench_envs.py --env alfworld            # valid_seen games, admissible commands
    .venv/bin/python scripts/bench_envs.py --env scienceworld --level split=dev
    .venv/bin/python scripts/bench_envs.py --env math --actions 42
    .venv/bin/python scripts/bench_envs.py --quest-length 3 --nb-objects 4 --world-size 3

Pool bench: `--envs` episodes (tasks = seeds 0..envs-1 of the env's task source) are stepped
together, one `step_many` batch per round, with a random command from each env's admissible list
(or from `--actions`); an episode that ends is reset, and resets are left out of steps/s. "first
reset" includes starting the workers and building the envs. On a machine with fewer cores than
workers, more workers cannot help.
"""

import argparse
import random
import time

from agents.tasks import materialise
from environments.pool import EnvError, EnvPool

# What each env plays by default: kwargs of its constructor, level of its task source, and the
# actions to pick from when the env lists no admissible commands.
PRESETS = {
    "textworld": ({"admissible_commands": True}, {}, ["look"]),
    "alfworld": ({"admissible_commands": True}, {"split": "valid_seen"}, ["look"]),
    "scienceworld": ({}, {"split": "train"}, ["look around", "inventory", "look at door"]),
    "math": ({}, {}, ["42"]),
}


def bench_pool(env_id, kwargs, options, actions, workers, steps) -> None:
    rng = random.Random(0)
    with EnvPool(workers) as pool:
        handles = [pool.open(env_id, kwargs) for _ in options]
        start = time.perf_counter()
        infos = [_info(r) for r in pool.reset_many(handles, None, options)]
        first_reset = time.perf_counter() - start
        step_time, done, episodes, errors = 0.0, 0, 0, 0
        while done < steps:
            moves = [rng.choice(info.get("admissible_commands") or actions) for info in infos]
            start = time.perf_counter()
            results = pool.step_many(handles, moves)
            step_time += time.perf_counter() - start
            done += len(handles)
            ended = [i for i, r in enumerate(results) if isinstance(r, EnvError) or r[2] or r[3]]
            errors += sum(isinstance(results[i], EnvError) for i in ended)
            for i, result in enumerate(results):
                if not isinstance(result, EnvError):
                    infos[i] = result[4]
            if ended:
                episodes += len(ended)
                again = [handles[i] for i in ended]
                for i, result in zip(ended, pool.reset_many(again, None, [options[i] for i in ended]), strict=True):
                    infos[i] = _info(result)
    print(
        f"{env_id:12} workers={workers}  envs={len(handles)}  first reset {first_reset:6.2f} s  "
        f"{done / step_time:8.0f} steps/s  ({episodes} episodes ended, {errors} env errors)"
    )


def _info(result) -> dict:
    if isinstance(result, EnvError):
        raise SystemExit(f"reset failed: {result.message}")
    return result[1]


def bench_single(game_file: str, admissible_commands: bool, steps: int, resets: int, max_steps: int) -> None:
    """One TextWorld env in this process, no pool: what the env itself costs."""
    from environments.textworld_env import TextWorldEnv

    # Both runs draw from the same fixed command pool, so they differ only in what the env computes.
    _, info = TextWorldEnv(game_file).reset()
    commands = info["admissible_commands"]
    rng = random.Random(0)
    env = TextWorldEnv(game_file, admissible_commands=admissible_commands, max_steps=max_steps)
    start = time.perf_counter()
    env.reset()
    first_reset = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(resets):
        env.reset()
    reset_ms = (time.perf_counter() - start) / resets * 1e3

    step_time, episodes = 0.0, 0
    for _ in range(steps):
        action = rng.choice(commands)
        start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        step_time += time.perf_counter() - start
        if terminated or truncated:
            episodes += 1
            env.reset()
    print(
        f"admissible_commands={admissible_commands!s:5}  first reset {first_reset * 1e3:6.1f} ms  "
        f"reset {reset_ms:5.1f} ms  step {step_time / steps * 1e3:5.2f} ms  "
        f"{steps / step_time:7.0f} steps/s  ({episodes} episodes)"
    )


def _pairs(items: list[str]) -> dict:
    """`key=value` strings -> dict; values that look like ints become ints."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="textworld", choices=sorted(PRESETS))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0 = in-process")
    parser.add_argument("--envs", type=int, default=4, help="episodes stepped together")
    parser.add_argument("--steps", type=int, default=1000, help="env steps per run")
    parser.add_argument("--level", nargs="*", default=[], help="task-source level keys, e.g. split=dev")
    parser.add_argument("--kwargs", nargs="*", default=[], help="env constructor kwargs, e.g. max_steps=30")
    parser.add_argument("--actions", nargs="*", default=None, help="actions when the env lists none")
    parser.add_argument("--no-single", action="store_true", help="textworld: skip the one-env timing")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--nb-objects", type=int, default=3)
    parser.add_argument("--quest-length", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--resets", type=int, default=50, help="--single: resets to time")
    args = parser.parse_args()

    kwargs, level, actions = PRESETS[args.env]
    kwargs = {**kwargs, "max_steps": args.max_steps, **_pairs(args.kwargs)}
    if args.env == "textworld":
        level = {"world_size": args.world_size, "nb_objects": args.nb_objects, "quest_length": args.quest_length}
    elif args.env == "math":
        kwargs.pop("max_steps")  # a math episode ends on its answer
    level = {**level, **_pairs(args.level)}
    try:
        options = materialise(args.env, list(range(args.envs)), level)
    except (ImportError, KeyError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"cannot make {args.env} tasks at level {level}: {type(exc).__name__}: {exc}") from None
    print(f"{args.env}: {args.envs} tasks at level {level}, kwargs {kwargs}")
    if args.env == "textworld" and not args.no_single:
        for admissible_commands in (False, True):
            bench_single(options[0]["game_file"], admissible_commands, args.steps, args.resets, args.max_steps)
    for workers in args.workers:
        bench_pool(args.env, kwargs, options, args.actions or actions, workers, args.steps)


if __name__ == "__main__":
    main()
