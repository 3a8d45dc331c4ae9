"""SFT throughput: entrorl's learner against a plain HF training loop on the same chats.

    .venv/bin/python scripts/bench_sft.py --model tiny --threads 1          # seconds
    .venv/bin/python scripts/bench_sft.py --threads 1 --samples 16          # SmolLM2-135M-Instruct
    .venv/bin/python scripts/bench_sft.py --model tiny --packing on         # packed rows only

Data: `--samples` chat conversations of uneven lengths (a seeded mix of 1-4 user/assistant turns,
texts of log-uniform word counts), written as a JSONL file and turned into `Trajectory` samples by
`agents.chat_data.chat_samples` with the model's tokenizer (loss on the assistant turns). The
samples are cut into consecutive batches of `--batch-size`; both sides train on the same batches
in the same order, fp32, on `--threads` CPU threads, one optimizer step per batch.

  entrorl   `DeepSpeedLearner` under `sft_config` (the `nll` loss), `learner.update(batch, ones)`:
            micro-batches of at most `--micro-batch-tokens` tokens, packed into one row
            (`--packing on`) or one row per prompt group padded to the longest (`off`; one
            row per sample here: the prompts differ); the LM head runs on target positions
            only. `--packing both` (the default) runs both layouts; the headline
            figures (`entrorl_*`, `speedup`) are the packed run's, the padded run's have their
            own keys (`entrorl_padded_*`).
  hf        AutoModelForCausalLM + torch.optim.AdamW (same lr, betas, weight decay, gradient
            clipping), each batch right-padded to its longest sample with an attention mask and
            labels -100 on prompt, non-assistant and padding tokens; loss = model(...).loss (the
            token mean of -log p over the batch's target tokens, as entrorl's nll), backward, step.

tokens/s = the timed batches' prompt + response tokens (padding not counted) / seconds, after
one warm-up step on the first batch (`--repeats` timed passes: the median; the machine's other
load shows as their spread). Peak memory = the resident set's high-water mark
(ru_maxrss) of each side run in its own subprocess (`--side`), so the peaks do not mix; it
includes the imports (DeepSpeed's on the entrorl side) and the loaded model, given apart as
`*_rss_before_mib` (after loading, before the first step).

`--model tiny` is a random 2-layer Llama built in code over SmolLM2's vocabulary and tokenizer
(nothing downloaded), for a quick run; the default is the real SmolLM2-135M-Instruct (slow on CPU).
The last line printed is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from agents.types import Trajectory  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
WORDS = (
    "the of and to in is that it for on with as was at by this be from or an are not have which "
    "one you all were can there their we when your more time so what about if out up some would "
    "into them then these two other could first like model train token batch step reward agent "
    "room door key open north south east west take drop look inventory kitchen garden function "
    "value return result error check answer number total compute because therefore however next "
    "list string file line path read write call tool search query page data table column row"
).split()
SYSTEMS = ("You are a helpful assistant.", "You are a careful agent. Think, then answer briefly.")


# -- data -------------------------------------------------------------------------------------------


def _text(rng: random.Random, low: int, high: int) -> str:
    """A sentence-ish text of a log-uniform number of words in [low, high]."""
    n = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    words = [rng.choice(WORDS) for _ in range(n)]
    for k in range(rng.randrange(6, 14), n, rng.randrange(6, 14)):
        words[k - 1] += rng.choice(".,;?")
    return " ".join(words).capitalize() + "."


def conversations(n: int, seed: int = 0, user_words: int = 60, assistant_words: int = 200) -> list[dict]:
    """`n` JSONL records {"messages": [...]} of 1-4 user/assistant turns of uneven lengths,
    a system message in about half of them."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": _text(rng, 3, user_words)})
            messages.append({"role": "assistant", "content": _text(rng, 2, assistant_words)})
        records.append({"messages": messages})
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return Path(path)


def load_samples(path: str | Path, model_dir: str | Path) -> list[Trajectory]:
    """The SFT samples of a JSONL file of chats, tokenized with `model_dir`'s tokenizer."""
    from transformers import AutoTokenizer

    from agents.chat_data import chat_samples

    return chat_samples(path, AutoTokenizer.from_pretrained(model_dir))


def make_batches(samples: list[Trajectory], batch_size: int) -> list[list[Trajectory]]:
    """Consecutive batches of `batch_size` samples (the last one may be shorter)."""
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def sequence_tokens(batch: list[Trajectory]) -> int:
    return sum(len(s.prompt_ids) + len(s.response_ids) for s in batch)


def padding_fraction(batches: list[list[Trajectory]]) -> float:
    """Share of the HF side's input positions that are padding (each batch padded to its longest)."""
    padded = sum(len(b) * max(len(s.prompt_ids) + len(s.response_ids) for s in b) for b in batches)
    return 1.0 - sum(sequence_tokens(b) for b in batches) / padded


def build_tiny_model(
    folder: str | Path, tokenizer_dir: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0
):
    """A random tiny Llama over the tokenizer's vocabulary, saved with it as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# -- the two sides ----------------------------------------------------------------------------------


def _rss_mib() -> float:
    """The current resident set (Linux /proc; the high-water mark elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mib()


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _timed(batches: list[list[Trajectory]], step, repeats: int = 1) -> dict:
    """One warm-up step on the first batch (its loss: under the initial weights), then every
    batch timed, `repeats` passes; tokens/s over a pass's real tokens and its median seconds."""
    first_loss = step(batches[0])
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            step(batch)
        passes.append(time.perf_counter() - started)
    seconds = statistics.median(passes)
    tokens = sum(sequence_tokens(b) for b in batches)
    return {
        "first_loss": first_loss,
        "tokens": tokens,
        "seconds": seconds,
        "pass_seconds": passes,
        "tokens_per_s": tokens / seconds,
    }


def entrorl_learner(model_dir: str | Path, packing: bool, micro_batch_tokens: int, threads: int):
    from trainer.config import load
    from trainer.learner.deepspeed import DeepSpeedLearner
    from trainer.sft import sft_config

    overrides = [f"learner.packing={packing}", f"learner.micro_batch_tokens={micro_batch_tokens}"]
    overrides.append(f"learner.threads={threads}")
    return DeepSpeedLearner(sft_config(load(None, overrides), "", False, False), str(model_dir))


def run_entrorl(
    model_dir: str | Path, batches: list[list[Trajectory]], packing: bool = True,
    micro_batch_tokens: int = 2048, threads: int = 1, repeats: int = 1,
) -> dict:  # fmt: skip
    learner = entrorl_learner(model_dir, packing, micro_batch_tokens, threads)
    rss_before = _rss_mib()

    def step(batch: list[Trajectory]) -> float:
        ones = [torch.ones(len(s.response_ids)) for s in batch]
        return learner.update(batch, ones)["loss/policy"]  # the loss before this step's update

    out = _timed(batches, step, repeats)
    cfg = learner.cfg.learner
    return {
        **out,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
        "lr": cfg.lr,
        "packing": packing,
    }


def hf_inputs(batch: list[Trajectory], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels of a batch right-padded to its longest sample: labels
    are the token ids where the sample's loss mask is 1 (assistant turns), -100 elsewhere
    (HF shifts them: logits at t predict labels at t + 1)."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, s in enumerate(batch):
        tokens = s.prompt_ids + s.response_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        mask = torch.tensor([0] * len(s.prompt_ids) + list(s.loss_mask), dtype=torch.bool)
        labels[row, : len(tokens)] = torch.where(mask, ids[row, : len(tokens)], -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def run_hf(
    model_dir: str | Path,
    batches: list[list[Trajectory]],
    threads: int = 1,
    lr: float | None = None,
    repeats: int = 1,
) -> dict:
    """The plain HF loop with entrorl's SFT optimizer settings (lr, betas, weight decay, clipping)."""
    from transformers import AutoModelForCausalLM

    from trainer.config import load
    from trainer.sft import sft_config

    learner_cfg = sft_config(load(None, []), "", False, False).learner
    lr = learner_cfg.lr if lr is None else lr
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=tuple(learner_cfg.betas),
        weight_decay=learner_cfg.weight_decay,
        foreach=True,
    )
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rss_before = _rss_mib()

    def step(batch: list[Trajectory]) -> float:
        loss = model(**hf_inputs(batch, pad_id), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), learner_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    out = _timed(batches, step, repeats)
    return {**out, "rss_before_mib": rss_before, "peak_rss_mib": _peak_rss_mib(), "lr": lr}


def run_side(side: str, model_dir: str | Path, data: str | Path, args: argparse.Namespace) -> dict:
    batches = make_batches(load_samples(data, model_dir), args.batch_size)
    if side == "hf":
        return run_hf(model_dir, batches, args.threads, repeats=args.repeats)
    packing = side == "entrorl-packed"
    return run_entrorl(model_dir, batches, packing, args.micro_batch_tokens, args.threads, args.repeats)


# -- the comparison ---------------------------------------------------------------------------------


def summarize(results: dict[str, dict], batches: list[list[Trajectory]]) -> dict:
    """The figures: entrorl (the first layout run) against hf, and each layout's own keys."""
    layouts = [k for k in ("entrorl-packed", "entrorl-padded") if k in results]
    main, hf = results[layouts[0]], results["hf"]
    figures = {
        "entrorl_tokens_per_s": main["tokens_per_s"],
        "hf_tokens_per_s": hf["tokens_per_s"],
        "speedup": main["tokens_per_s"] / hf["tokens_per_s"],
        "entrorl_peak_rss_mib": main["peak_rss_mib"],
        "hf_peak_rss_mib": hf["peak_rss_mib"],
        "samples": sum(len(b) for b in batches),
        "padding_fraction": padding_fraction(batches),
        "entrorl_packing": layouts[0] == "entrorl-packed",
        "tokens": hf["tokens"],
        "target_tokens": sum(s.num_sampled_tokens for b in batches for s in b),
        "batches": len(batches),
        "entrorl_rss_before_mib": main["rss_before_mib"],
        "hf_rss_before_mib": hf["rss_before_mib"],
        "entrorl_first_loss": main["first_loss"],
        "hf_first_loss": hf["first_loss"],
    }
    for layout in layouts[1:]:
        name = layout.replace("-", "_")
        figures[f"{name}_tokens_per_s"] = results[layout]["tokens_per_s"]
        figures[f"{name}_speedup"] = results[layout]["tokens_per_s"] / hf["tokens_per_s"]
        figures[f"{name}_peak_rss_mib"] = results[layout]["peak_rss_mib"]
    return figures


def _child(side: str, model_dir: Path, data: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--side", side, "--model-dir", str(model_dir), "--data", str(data),
        "--batch-size", str(args.batch_size), "--micro-batch-tokens", str(args.micro_batch_tokens),
        "--threads", str(args.threads), "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {side} side failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"'tiny', an embedded model ({DEFAULT_MODEL}) or a folder"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step (both sides)")
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=2048, help="entrorl's learner.micro_batch_tokens"
    )
    parser.add_argument(
        "--packing", choices=("on", "off", "both"), default="both", help="entrorl's learner.packing"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on each side (0 = all cores)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the batches (median)")
    parser.add_argument("--user-words", type=int, default=60, help="longest user text, in words")
    parser.add_argument("--assistant-words", type=int, default=200, help="longest assistant text, in words")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--side", choices=("entrorl-packed", "entrorl-padded", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a child: one side, one JSON line
        print(json.dumps(run_side(args.side, args.model_dir, args.data, args)), flush=True)
        return {}

    from agents.engines.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        if args.model == "tiny":
            model_dir = build_tiny_model(work / "tiny", resolve_model(DEFAULT_MODEL))
        else:
            model_dir = Path(resolve_model(args.model))
        records = conversations(args.samples, args.seed, args.user_words, args.assistant_words)
        data = write_jsonl(records, work / "chats.jsonl")
        batches = make_batches(load_samples(data, model_dir), args.batch_size)
        lengths = sorted(sequence_tokens([s]) for b in batches for s in b)
        print(
            f"{args.model}: {len(lengths)} samples, {sum(lengths)} tokens (lengths {lengths[0]}..{lengths[-1]}, "
            f"median {lengths[len(lengths) // 2]}), {len(batches)} batches of {args.batch_size}; "
            f"HF padding {padding_fraction(batches):.1%}; threads={args.threads}",
            flush=True,
        )
        layouts = {
            "on": ["entrorl-packed"],
            "off": ["entrorl-padded"],
            "both": ["entrorl-packed", "entrorl-padded"],
        }
        results = {}
        for side in [*layouts[args.packing], "hf"]:
            results[side] = _child(side, model_dir, data, args)
            r = results[side]
            print(
                f"{side:>15}: {r['tokens_per_s']:8.1f} tokens/s ({r['tokens']} tokens in {r['seconds']:.1f} s; "
                f"passes {', '.join(f'{t:.1f}' for t in r['pass_seconds'])} s), "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB (after loading {r['rss_before_mib']:.0f}), "
                f"first-batch loss {r['first_loss']:.5f}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = summarize(results, batches)
    print(
        f"speedup entrorl / HF: {figures['speedup']:.2f}x; peak RSS {figures['entrorl_peak_rss_mib']:.0f} "
        f"vs {figures['hf_peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
