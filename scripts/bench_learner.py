"""Learner throughput: fwd + bwd + AdamW tokens/s through the real DeepSpeed learner.

    .venv/bin/python scripts/bench_learner.py                       # SmolLM2-135M, step-wise batch
    .venv/bin/python scripts/bench_learner.py --micro-batch-tokens 1024 --no-packing
    python scripts/bench_learner.py --shape qwen2.5-1.5b --device cuda --dtype bfloat16 \\
        --samples 64 --prompt-len 512 --response-len 512 --response-jitter 0.9 \\
        --micro-batch-tokens 8192 --compare-packing --json bench.json   # GPU: tokens/s and MFU

The batch imitates one quickstart step: `--samples` step-wise samples of `--prompt-len` prompt
tokens (+-10 %) and `--response-len` sampled tokens (+- `--response-jitter` of it, uniformly),
all with non-zero advantages.

`--shape` benchmarks a random model with a published architecture's sizes (SHAPES), built in code
(nothing is downloaded) and saved to a temporary folder for the learner to load. `--device cuda`
runs the learner on the GPU (`train.device=cuda`; `--dtype bfloat16`: bf16 compute with fp32
master weights). `--compare-packing` times packed and padded micro-batches on the same learner.
MFU (model FLOPs utilisation) = 6 * N * tokens/s / peak, N = every parameter (a tied embedding
once), tokens = the batch's real (unpadded) tokens; 6 N per token is the usual forward + backward
estimate (attention's L^2 term and the LM head's recomputation in the backward are not counted),
peak = 989e12 FLOP/s (H100/H200 bf16 dense) on CUDA unless `--peak-flops` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from agents.types import Trajectory  # noqa: E402

H100_BF16_DENSE_FLOPS = 989e12
MFU_FORMULA = "6 * params * tokens_per_s / peak_flops"

# Published sizes (the models' config.json), with the real 151,936-row vocabulary. `qwen2.5-tiny`
# keeps that vocabulary (so the Qwen2.5 tokenizer fits) around a 2-layer, 64-wide body: CPU runs.
SHAPES: dict[str, dict[str, int]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936,
    ),
    "qwen2.5-tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=151936,
    ),
}  # fmt: skip
QWEN_BOS, QWEN_EOS, QWEN_PAD = 151643, 151645, 151643  # <|endoftext|>, <|im_end|>, <|endoftext|>


def qwen2_config(shape: str):
    from transformers import Qwen2Config

    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r}: use one of {', '.join(SHAPES)}")
    return Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B and -1.5B
        bos_token_id=QWEN_BOS,
        eos_token_id=QWEN_EOS,
        pad_token_id=QWEN_PAD,
    )


def save_random_model(
    shape: str, folder: str | Path, *, device: str = "cpu", dtype: str = "float32", tokenizer: str | None = None,
    seed: int = 0,
) -> int:
    """A random `shape` model as a local HF folder (+ the tokenizer folder's files); returns its
    parameter count. Initialised on `device` (seconds on a GPU for 1.5B), saved in `dtype`."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2_config(shape))
    model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = [QWEN_EOS, QWEN_PAD]
    model.generation_config.pad_token_id = QWEN_PAD
    model.save_pretrained(folder)
    if tokenizer:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
        if len(loaded) > model.config.vocab_size:
            raise SystemExit(f"tokenizer {tokenizer} has {len(loaded)} tokens, the {shape} embedding {model.config.vocab_size}")
        loaded.save_pretrained(folder)
    return count_params(model)


def count_params(model: torch.nn.Module) -> int:
    """Every parameter once (a tied embedding / LM head counts once); ZeRO-3 stubs by ds_numel."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def mfu(params: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 * params * tokens_per_s / peak_flops (None without a peak)."""
    return 6.0 * params * tokens_per_s / peak_flops if peak_flops else None


def fake_batch(
    n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0, jitter: float = 0.0
) -> list[Trajectory]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        p = int(prompt_len * rng.uniform(0.9, 1.1))
        r = max(1, round(response_len * rng.uniform(1 - jitter, 1 + jitter))) if jitter else response_len
        samples.append(
            Trajectory(
                prompt_ids=[rng.randrange(vocab) for _ in range(p)],
                response_ids=[rng.randrange(vocab) for _ in range(r)],
                loss_mask=[1] * r,
                rollout_logprobs=[-1.0] * r,
                entropies=[1.0] * r,
                reward=float(i % 2),
                group_id=i // 4,
                traj_id=i,
            )
        )
    return samples


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--shape", default=None, help=f"a random model of these sizes instead: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (train.device)")
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32, or bfloat16 on CUDA")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=210)
    parser.add_argument("--response-len", type=int, default=5)
    parser.add_argument("--response-jitter", type=float, default=0.0, help="response lengths +- this fraction")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--compare-packing", action="store_true", help="time packed and padded micro-batches")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-flops", type=float, default=None, help="for MFU (default: 989e12 on CUDA)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        os.environ["DS_ACCELERATOR"] = "cuda"  # before DeepSpeed is imported
    peak = args.peak_flops or (H100_BF16_DENSE_FLOPS if args.device.startswith("cuda") else None)

    from agents.engines.models import resolve_model
    from trainer.config import load
    from trainer.learner.deepspeed import DeepSpeedLearner

    folder = None
    try:
        if args.shape:
            folder = tempfile.mkdtemp(prefix=f"bench-{args.shape}-")
            started = time.perf_counter()
            save_random_model(args.shape, folder, device=args.device, dtype=args.dtype)
            print(f"random {args.shape} saved in {time.perf_counter() - started:.1f} s", flush=True)
            model_path = folder
        else:
            model_path = resolve_model(args.model)
        overrides = [
            f"learner.micro_batch_tokens={args.micro_batch_tokens}",
            f"learner.packing={not args.no_packing}",
            f"learner.zero_stage={args.zero_stage}",
            "algo.skip_zero_advantage=false",
        ]
        if args.device != "cpu" or args.dtype != "float32":  # the defaults: the CPU run as before
            overrides += [f"train.device={args.device}", f"model.dtype={args.dtype}"]
        if args.gradient_checkpointing:
            overrides.append("model.gradient_checkpointing=true")
        learner = DeepSpeedLearner(load(None, overrides), model_path)
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)  # loaded: the learner holds the weights now
    params = count_params(learner.engine.module)
    vocab = learner.engine.module.config.vocab_size
    samples = fake_batch(args.samples, args.prompt_len, args.response_len, vocab, jitter=args.response_jitter)
    advantages = [torch.full((len(s.response_ids),), 1.0 if s.reward else -1.0) for s in samples]
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    layouts = [True, False] if args.compare_packing else [not args.no_packing]
    figures: dict = {
        "model": args.shape or args.model,
        "params": params,
        "device": args.device,
        "dtype": args.dtype,
        "zero_stage": args.zero_stage,
        "samples": args.samples,
        "tokens": tokens,
        "micro_batch_tokens": args.micro_batch_tokens,
        "peak_flops": peak,
        "mfu_formula": MFU_FORMULA,
    }
    for packing in layouts:
        name = "packed" if packing else "padded"
        learner.cfg.learner.packing = packing
        learner.micro_batch_tokens = args.micro_batch_tokens  # an OOM retry of the other layout lowered it
        # warm-up: kernels, allocator (the whole batch on a GPU; a few samples keep the CPU run short)
        warm = len(samples) if args.device.startswith("cuda") else 4
        learner.update(samples[:warm], advantages[:warm])
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rates = []
        for r in range(args.repeats):
            _sync(args.device)
            started = time.perf_counter()
            metrics = learner.update(samples, advantages)
            _sync(args.device)
            elapsed = time.perf_counter() - started
            rates.append(tokens / elapsed)
            print(
                f"repeat {r}: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.0f} tokens/s "
                f"(packing={packing}, micro_batch_tokens={args.micro_batch_tokens}, "
                f"threads={torch.get_num_threads()})",
                flush=True,
            )
        rate = statistics.median(rates)
        figures[f"tokens_per_s_{name}"] = rate
        figures[f"mfu_{name}"] = mfu(params, rate, peak)
        figures[f"oom_retries_{name}"] = metrics["learner/oom_retries"]
        figures[f"compute_tokens_{name}"] = metrics["learner/compute_tokens"]
        if args.device.startswith("cuda"):
            figures[f"peak_memory_gib_{name}"] = torch.cuda.max_memory_allocated() / 2**30
    if args.compare_packing:
        figures["packed_over_padded"] = figures["tokens_per_s_packed"] / figures["tokens_per_s_padded"]
    summary = ", ".join(
        f"{name} {figures[f'tokens_per_s_{name}']:.0f} tokens/s"
        + (f" (MFU {figures[f'mfu_{name}']:.1%})" if figures.get(f"mfu_{name}") is not None else "")
        for name in ("packed", "padded")
        if f"tokens_per_s_{name}" in figures
    )
    mfu_note = f"; MFU = {MFU_FORMULA}, params = {params:,}, peak_flops = {peak:.3g}" if peak else ""
    print(f"{figures['model']} on {args.device} ({args.dtype}, ZeRO-{args.zero_stage}): {summary}{mfu_note}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
