"""Rollout throughput: N concurrent multi-turn episodes through the one rollout loop (one batched
engine call per round), with and without the HF engine's prefix cache, vs the same episodes
played one at a time.

Prints generated tokens/s, wall time, the engine-busy fraction (time inside `generate` / wall
time) and the share of prompt tokens served from the prefix cache, and the ratios.

    .venv/bin/python scripts/bench_rollout.py                          # 32 ALFWorld valid_seen episodes
    .venv/bin/python scripts/bench_rollout.py --mode trajectory        # the whole history in every prompt
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
    parser.add_argument("--mode", default="step", choices=["step", "trajectory"])
    parser.add_argument("--history-window", type=int, default=2, help="step mode: past turns in the prompt")
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
    tasks = [
        Task(env_id=args.env, group_id=i, env_kwargs=kwargs, reset_options=o) for i, o in enumerate(options)
    ]
    cfg = RolloutConfig(
        mode=args.mode,
        format="action_tag",
        history_window=args.history_window,
        max_turns=args.turns,
        max_new_tokens=args.new_tokens,
        max_context=4096,
    )
    sampling = SamplingConfig(temperature=1.0)
    cold = HFEngine(engine.model, engine.tokenizer, prefix_cache_bytes=0)  # same weights, no cache
    rollout, cold_rollout = Rollout(engine, engine.tokenizer, cfg), Rollout(cold, cold.tokenizer, cfg)
    rollout.run(tasks[:2], sampling, seed=0)  # warm-up: env caches, first kernels

    rows = {
        "batched": measure(rollout, [tasks], sampling),
        "batched_no_prefix_cache": measure(cold_rollout, [tasks], sampling),
    }
    if not args.skip_sequential:
        rows["one_at_a_time"] = measure(rollout, [[t] for t in tasks], sampling)
    rollout.close()
    cold_rollout.close()
    for name, row in rows.items():
        print(json.dumps({"mode": name, **row}))
    for other in ("batched_no_prefix_cache", "one_at_a_time"):
        if other in rows:
            speedup = rows["batched"]["gen_tok_per_s"] / max(rows[other]["gen_tok_per_s"], 1e-9)
            print(f"batched (prefix cache) / {other} generated tok/s: {speedup:.2f}x")


def measure(rollout, batches, sampling) -> dict:
    tokens = generate = env = prompt = cached = 0.0
    rollout.engine.reset_prefix_cache()  # no arm starts warm from an earlier one
    started = time.perf_counter()
    for k, batch in enumerate(batches):
        metrics = rollout.run(batch, sampling, seed=k).metrics
        tokens += metrics["rollout/gen_tokens"]
        generate += metrics["time/generate"]
        env += metrics["time/env"]
        prompt += metrics["engine/prompt_tokens"]
        cached += metrics["engine/cached_prompt_tokens"]
    wall = time.perf_counter() - started
    return {
        "episodes": sum(len(b) for b in batches),
        "gen_tokens": tokens,
        "wall_s": round(wall, 1),
        "gen_tok_per_s": round(tokens / wall, 1),
        "engine_busy": round(generate / wall, 3),
        "env_s": round(env, 1),
        "prompt_tokens": prompt,
        "cached_prompt_share": round(cached / max(prompt, 1), 3),
    }


if __name__ == "__main__":
    main()
