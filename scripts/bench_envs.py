"""Environment speed: game generation, reset and step times for TextWorld on one game.

Run from the repo root:
    .venv/bin/python scripts/bench_envs.py                 # W1 O3 Q1, seed 1, 2000 steps
    .venv/bin/python scripts/bench_envs.py --quest-length 3 --nb-objects 4 --world-size 3

Steps pick a random command from those admissible at the start (seeded), so episodes end by winning, losing or
`--max-steps`; reset time is measured separately and left out of steps/s.
"""

import argparse
import random
import time

from environments.textworld_env import TextWorldEnv, ensure_games, games_dir


def bench(game_file: str, admissible_commands: bool, steps: int, resets: int, max_steps: int) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--nb-objects", type=int, default=3)
    parser.add_argument("--quest-length", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--resets", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--cache-dir", default=None, help="default: $ENTRORL_CACHE or ~/.cache/entrorl")
    args = parser.parse_args()

    level = {"world_size": args.world_size, "nb_objects": args.nb_objects, "quest_length": args.quest_length}
    cached = (games_dir(**level, cache_dir=args.cache_dir) / f"g{args.seed}.z8").is_file()
    start = time.perf_counter()
    (game_file,) = ensure_games([args.seed], **level, cache_dir=args.cache_dir)
    made = "cached" if cached else f"made in {time.perf_counter() - start:.1f} s"
    print(f"TextWorld {game_file} ({made})")
    for admissible_commands in (False, True):
        bench(game_file, admissible_commands, args.steps, args.resets, args.max_steps)


if __name__ == "__main__":
    main()
