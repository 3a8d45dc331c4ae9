"""Learner throughput: fwd + bwd + AdamW tokens/s through the real DeepSpeed learner.

    .venv/bin/python scripts/bench_learner.py                       # SmolLM2-135M, step-wise batch
    .venv/bin/python scripts/bench_learner.py --micro-batch-tokens 1024 --no-packing

The batch imitates one quickstart step: `--samples` step-wise samples of `--prompt-len` prompt
tokens (+-10 %) and `--response-len` sampled tokens, all with non-zero advantages.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from agents.engines.models import resolve_model  # noqa: E402
from agents.types import Trajectory  # noqa: E402
from trainer.config import load  # noqa: E402


def fake_batch(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        p = int(prompt_len * rng.uniform(0.9, 1.1))
        samples.append(
            Trajectory(
                prompt_ids=[rng.randrange(vocab) for _ in range(p)],
                response_ids=[rng.randrange(vocab) for _ in range(response_len)],
                loss_mask=[1] * response_len,
                rollout_logprobs=[-1.0] * response_len,
                entropies=[1.0] * response_len,
                reward=float(i % 2),
                group_id=i // 4,
                traj_id=i,
            )
        )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=210)
    parser.add_argument("--response-len", type=int, default=5)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from trainer.learner.deepspeed import DeepSpeedLearner

    cfg = load(
        None,
        [
            f"learner.micro_batch_tokens={args.micro_batch_tokens}",
            f"learner.packing={not args.no_packing}",
            f"learner.zero_stage={args.zero_stage}",
            "algo.skip_zero_advantage=false",
        ],
    )
    learner = DeepSpeedLearner(cfg, resolve_model(args.model))
    vocab = learner.engine.module.config.vocab_size
    samples = fake_batch(args.samples, args.prompt_len, args.response_len, vocab)
    advantages = [torch.full((len(s.response_ids),), 1.0 if s.reward else -1.0) for s in samples]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    learner.update(samples[:4], advantages[:4])  # warm-up
    for r in range(args.repeats):
        started = time.perf_counter()
        learner.update(samples, advantages)
        elapsed = time.perf_counter() - started
        print(
            f"repeat {r}: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.0f} tokens/s "
            f"(packing={not args.no_packing}, micro_batch_tokens={args.micro_batch_tokens}, "
            f"threads={torch.get_num_threads()})"
        )


if __name__ == "__main__":
    main()
