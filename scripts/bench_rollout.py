"""Rollout throughput: N concurrent multi-turn episodes through the one rollout loop (one batched
engine call per round) vs the same episodes played one at a time.

Prints generated tokens/s, wall time and the engine-busy fraction (time inside `generate` /
wall time) for both, and their ratio.

    .venv/bin/python scripts/bench_rollout.py                          # 32 ALFWorld valid_seen episodes
    .venv/bin/python scripts/bench_rollout.py --env textworld --episodes 16
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="alfworld", choices=["alfworld", "textworld"])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip-sequential", action="store_true")
    args = parser.parse_args()

    import torch

    from agents.config import RolloutConfig, SamplingConfig
    from agents.engines.hf import HFEngine
    from agents.engines.models import resolve_model
    from agents.rollout import Rollout, Task
    from agents.tasks import materialise

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = HFEngine.from_pretrained(resolve_model(args.model), device="cpu")
    level = {"split": "valid_seen"} if args.env == "alfworld" else {}
    options = materialise(args.env, list(range(args.episodes)), level)
    kwargs = {"admissible_commands": True, "max_steps": 50}
    tasks = [Task(env_id=args.env, group_id=i, env_kwargs=kwargs, reset_options=o) for i, o in enumerate(options)]
    cfg = RolloutConfig(
        mode="step", format="action_tag", history_window=2, max_turns=args.turns, max_new_tokens=args.new_tokens
    )
    sampling = SamplingConfig(temperature=1.0)
    rollout = Rollout(engine, engine.tokenizer, cfg)
    rollout.run(tasks[:2], sampling, seed=0)  # warm-up: env caches, first kernels

    rows = {"batched": measure(rollout, [tasks], sampling)}
    if not args.skip_sequential:
        rows["one_at_a_time"] = measure(rollout, [[t] for t in tasks], sampling)
    rollout.close()
    for name, row in rows.items():
        print(json.dumps({"mode": name, **row}))
    if "one_at_a_time" in rows:
        speedup = rows["batched"]["gen_tok_per_s"] / max(rows["one_at_a_time"]["gen_tok_per_s"], 1e-9)
        print(f"batched / one-at-a-time generated tok/s: {speedup:.2f}x")


def measure(rollout, batches, sampling) -> dict:
    tokens = generate = env = 0.0
    started = time.perf_counter()
    for k, batch in enumerate(batches):
        metrics = rollout.run(batch, sampling, seed=k).metrics
        tokens += metrics["rollout/gen_tokens"]
        generate += metrics["time/generate"]
        env += metrics["time/env"]
    wall = time.perf_counter() - started
    return {
        "episodes": sum(len(b) for b in batches),
        "gen_tokens": tokens,
        "wall_s": round(wall, 1),
        "gen_tok_per_s": round(tokens / wall, 1),
        "engine_busy": round(generate / wall, 3),
        "env_s": round(env, 1),
    }


if __name__ == "__main__":
    main()
