"""Soak test (issue #9): train a tiny random Llama on real TextWorld games (configs/debug/cpu_tiny.yaml,
env worker processes, checkpoints every few steps) for a fixed wall time, and check that memory
stays flat, file descriptors and processes do not leak, and throughput does not decay.

After every step it records the RSS of this process and of all its descendants (env workers,
the forkserver), open fds, live descendant processes, threads, step seconds and generated
tokens/s; prints a table now and then, and a verdict at the end. Exit 1 if, over the second
half, total RSS grew > 20 % (least-squares fit), fds / child fds / processes / threads grew
steadily (the last 10 % of steps all above every value of the 10 % at half time), or the median
step time of the last 10 % of steps is > 1.5x that of the first 10 %.

    DS_ACCELERATOR=cpu .venv/bin/python scripts/soak.py --minutes 30
    DS_ACCELERATOR=cpu .venv/bin/python scripts/soak.py --minutes 2 rollout.env_workers=0   # + overrides
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "debug" / "cpu_tiny.yaml"
MB = 1024 * 1024
RSS_GROWTH_LIMIT = 20.0  # % over the second half
STEP_TIME_LIMIT = 1.5  # last 10 % / first 10 % of steps (medians)
STEADY_KEYS = ("fds", "child_fds", "children", "threads")


# -- analysis (pure: records in, verdict out) -------------------------------------------------------


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return slope, my - slope * mx


def analyze(records: list[dict]) -> dict:
    """The verdict over per-step records (keys: t [s since start], rss_mb, rss_children_mb,
    rss_total_mb, fds, child_fds, children, threads, step_s, tokens_per_s). `problems` lists what
    failed; empty = pass."""
    n = len(records)
    if n < 4:
        return {"steps": n, "problems": [f"too few steps to judge ({n} < 4)"]}
    k = max(1, n // 10)
    first, last, half = records[:k], records[-k:], records[n // 2 :]
    mid = half[:k]

    def col(rows, key):
        return [r[key] for r in rows]

    def med(rows, key):
        return statistics.median(col(rows, key))

    problems = []
    verdict: dict = {"steps": n, "minutes": round(records[-1]["t"] / 60, 2), "window_steps": k}
    for key in ("rss_mb", "rss_children_mb", "rss_total_mb"):
        start, end = med(first, key), med(last, key)
        verdict[key] = {"first": round(start, 1), "last": round(end, 1),
                        "change_pct": round(100 * (end - start) / start, 1) if start else 0.0}  # fmt: skip
    hours = [r["t"] / 3600 for r in half]
    slope, intercept = _slope(hours, col(half, "rss_total_mb"))
    at_mid = slope * hours[0] + intercept
    growth = 100 * slope * (hours[-1] - hours[0]) / at_mid if at_mid > 0 else 0.0
    verdict["rss_total_mb"].update(
        slope_mb_per_hour_2nd_half=round(slope, 2), growth_pct_2nd_half=round(growth, 1)
    )
    if growth > RSS_GROWTH_LIMIT:
        problems.append(
            f"total RSS grew {growth:.1f} % over the second half (> {RSS_GROWTH_LIMIT:.0f} %; {slope:.1f} MB/h)"
        )
    for key in STEADY_KEYS:
        values = col(records, key)
        steady = min(col(last, key)) > max(col(mid, key))
        verdict[key] = {
            "min": min(values),
            "max": max(values),
            "first": values[0],
            "last": values[-1],
            "grew_steadily": steady,
        }
        if steady:
            problems.append(
                f"{key} grew steadily: {max(col(mid, key))} at half time, >= {min(col(last, key))} at the end"
            )
    start, end = med(first, "step_s"), med(last, "step_s")
    ratio = end / start if start else 1.0
    verdict["step_s"] = {"first": round(start, 3), "last": round(end, 3), "ratio": round(ratio, 2)}
    if ratio > STEP_TIME_LIMIT:
        problems.append(
            f"median step time grew {ratio:.2f}x (> {STEP_TIME_LIMIT}x): {start:.2f} s -> {end:.2f} s"
        )
    verdict["tokens_per_s"] = {
        "first": round(med(first, "tokens_per_s"), 1),
        "last": round(med(last, "tokens_per_s"), 1),
    }
    verdict["problems"] = problems
    return verdict


def format_verdict(v: dict) -> str:
    if "rss_total_mb" not in v:
        return "VERDICT: FAIL\n  " + "\n  ".join(v["problems"])
    rss = v["rss_total_mb"]
    lines = [
        f"VERDICT: {'PASS' if not v['problems'] else 'FAIL'}  ({v['steps']} steps, {v['minutes']} min; "
        f"windows of {v['window_steps']} steps)",
        f"  RSS total   {rss['first']:.1f} -> {rss['last']:.1f} MB ({rss['change_pct']:+.1f} %), second half "
        f"{rss['slope_mb_per_hour_2nd_half']:+.1f} MB/h ({rss['growth_pct_2nd_half']:+.1f} %)",
        f"  RSS self    {v['rss_mb']['first']:.1f} -> {v['rss_mb']['last']:.1f} MB ({v['rss_mb']['change_pct']:+.1f} %); "
        f"children {v['rss_children_mb']['first']:.1f} -> {v['rss_children_mb']['last']:.1f} MB",
    ]
    for key in STEADY_KEYS:
        s = v[key]
        lines.append(f"  {key:<11} min {s['min']} max {s['max']} (first {s['first']}, last {s['last']})"
                     + ("  GREW STEADILY" if s["grew_steadily"] else ""))  # fmt: skip
    st, tps = v["step_s"], v["tokens_per_s"]
    lines.append(f"  step time   {st['first']:.2f} -> {st['last']:.2f} s (x{st['ratio']:.2f})")
    lines.append(f"  tokens/s    {tps['first']:.1f} -> {tps['last']:.1f}")
    lines += [f"  problem: {p}" for p in v["problems"]]
    return "\n".join(lines)


# -- measuring ----------------------------------------------------------------------------------------


def sample_processes() -> dict:
    """Memory, fds, threads of this process and of all its descendants (env workers, forkserver)."""
    import psutil  # a dev dependency (pyproject [dev])

    me = psutil.Process()
    rss_children, child_fds, alive = 0, 0, 0
    for child in me.children(recursive=True):
        try:
            rss_children += child.memory_info().rss
            child_fds += child.num_fds()
            alive += 1
        except psutil.Error:  # it exited while we looked
            continue
    rss = me.memory_info().rss
    return {
        "rss_mb": rss / MB,
        "rss_children_mb": rss_children / MB,
        "rss_total_mb": (rss + rss_children) / MB,
        "fds": me.num_fds(),
        "child_fds": child_fds,
        "children": alive,
        "threads": me.num_threads(),
    }


def make_tiny_model(folder: Path) -> None:
    """A tiny random Llama over SmolLM2's tokenizer (as tests/conftest.py builds it), nudged for a
    few steps towards the digits 1-4: a purely random model never picks a valid numbered command,
    every advantage would be 0 and the learner would skip every update."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from agents.engines.models import EMBEDDED_MODELS

    package, gguf_file = EMBEDDED_MODELS["smollm2-135m-instruct"]
    tokenizer = AutoTokenizer.from_pretrained(
        Path(importlib.util.find_spec(package).origin).parent, gguf_file=gguf_file
    )
    vocab = len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ))  # fmt: skip
    target = torch.full((vocab,), 0.5 / vocab)
    target[tokenizer.convert_tokens_to_ids(list("1234"))] += 0.5 / 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        ids = torch.randint(3, vocab, (4, 32))
        loss = -(model(input_ids=ids).logits.log_softmax(-1) * target).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


HEADER = f"{'step':>5} {'min':>6} {'rss MB':>7} {'kids MB':>7} {'fds':>4} {'kfds':>5} {'kids':>4} {'thr':>4} {'step s':>7} {'tok/s':>7}"


def _row(r: dict) -> str:
    return (f"{r['step']:>5} {r['t'] / 60:>6.1f} {r['rss_mb']:>7.1f} {r['rss_children_mb']:>7.1f} {r['fds']:>4} "
            f"{r['child_fds']:>5} {r['children']:>4} {r['threads']:>4} {r['step_s']:>7.2f} {r['tokens_per_s']:>7.1f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall time of the training loop")
    parser.add_argument(
        "--out", default=None, help="JSON with every record and the verdict (default runs/soak-<time>.json)"
    )
    parser.add_argument(
        "--env-workers", type=int, default=2, help="env worker processes (0 = envs in this process)"
    )
    parser.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (2 kept)")
    parser.add_argument("--print-every", type=int, default=10, help="print a table row every N steps")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(ROOT))
    out = Path(args.out or ROOT / "runs" / f"soak-{datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    from trainer.config import load
    from trainer.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="entrorl-soak-") as tmp:
        model_dir, run_dir = Path(tmp) / "model", Path(tmp) / "run"
        make_tiny_model(model_dir)
        overrides = [
            f"model.name={model_dir}", "train.steps=1000000", "train.eval_before=false", "train.eval_after=false",
            "train.save_model=false", f"train.output_dir={run_dir}", f"train.save_every={args.save_every}",
            "train.keep_checkpoints=2", f"rollout.env_workers={args.env_workers}", *args.overrides,
        ]  # fmt: skip
        cfg = load(CONFIG, overrides)
        trainer = Trainer(cfg, run_name="soak")
        trainer.logger.console.quiet = True  # the table below replaces the per-step log lines
        last_metrics: dict = {}
        step_fn = trainer.step

        def step_and_keep() -> dict:
            last_metrics.clear()
            last_metrics.update(step_fn())
            return last_metrics

        trainer.step = step_and_keep
        records: list[dict] = []
        report = {
            "config": str(CONFIG.relative_to(ROOT)),
            "overrides": overrides[1:],
            "minutes": args.minutes,
        }
        print(
            f"soak: {args.minutes} min, {CONFIG.relative_to(ROOT)} {' '.join(overrides[1:])}\n{HEADER}",
            flush=True,
        )
        started, step, nonfinite = time.perf_counter(), 0, 0
        try:
            while time.perf_counter() - started < args.minutes * 60:
                step += 1
                t0 = time.perf_counter()
                nonfinite = trainer._train_step(step, nonfinite)  # the real step: log, NaN count, checkpoint
                step_s = time.perf_counter() - t0
                tokens = last_metrics.get("rollout/gen_tokens", 0.0)
                records.append({
                    "step": step, "t": time.perf_counter() - started, **sample_processes(), "step_s": step_s,
                    "tokens_per_s": tokens / max(last_metrics.get("time/rollout", 0.0), 1e-9),
                    "gen_tokens": tokens, "optimizer_steps": last_metrics.get("learner/optimizer_steps", 0.0),
                })  # fmt: skip
                if step % args.print_every == 0 or step == 1:
                    print(_row(records[-1]), flush=True)
                    out.write_text(json.dumps({**report, "records": records}))
        except KeyboardInterrupt:
            print("interrupted: judging the steps so far", flush=True)
        finally:
            trainer.rollout.close()
        verdict = analyze(records)
        out.write_text(json.dumps({**report, "verdict": verdict, "records": records}, indent=1))
        print(format_verdict(verdict))
        print(f"records and verdict: {out}")
        return 1 if verdict["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
