"""entrorl vs Hugging Face TRL's GRPOTrainer: the same single-turn GSM8K GRPO job through both.

    .venv/bin/python scripts/bench_vs_trl.py                        # 4 prompts x 4, 64 tokens, 4 steps
    .venv/bin/python scripts/bench_vs_trl.py --steps 6 --max-new-tokens 128 --out runs/bench_vs_trl.json

One invocation runs, one after the other on this machine (never concurrently), the same model
(SmolLM2-135M-Instruct by default, float32), the same prompts (GSM8K train questions 0 .. steps x
tasks - 1 in file order, step i taking the next `--tasks` of them, both sides rendering the same
chat messages with the same chat template), group size (TRL: num_generations), generation length
(max_completion_length), temperature 1.0 sampling, learning rate, one optimizer step per RL step,
no KL term (TRL: beta=0), no eval, and the same torch thread count. Each trainer runs in its own
worker process (entrorl in the main .venv, TRL in .venv-trl made by scripts/setup_trl, both started
from this file) so that each reports its own peak RSS. Step 1 of each side is a warm-up and is
dropped (`--warmup`); the table shows the mean over the remaining steps:

    generation tokens/s  sampled tokens (each completion up to and including its EOS) / generation s
    learner tokens/s     sequence tokens (each sample's prompt + completion) / learner s; entrorl:
                         its `time/update`; TRL: the step less its rollout phase
                         (`_generate_and_score_completions`), i.e. forward, loss, backward, AdamW
    s / RL step          wall time of one step (entrorl: `Trainer.step()`; TRL: a TrainerCallback,
                         on_step_begin -> on_step_end)
    peak RSS             ru_maxrss of the worker process (children, e.g. entrorl's math-verify pool,
                         not included; their peak is in the JSON)

and, below them, each phase's seconds per step: generation, learner, reward (entrorl: env steps +
the reward function, i.e. math-verify; TRL: the reward function), other (the rest: entrorl's
rollout bookkeeping, advantages and weight sync; TRL's prompt tokenising and advantages), and the
setup time from process start (imports, model load, optimizer / DeepSpeed init) to the first step.

Ratios are entrorl / TRL. Settings that differ by design: entrorl prefills each group's shared
prompt once and runs it once in the learner (`learner.share_prefix`), keeps a separate inference
copy of the weights (plus the `time/sync` copy after each update), and checks answers with
math-verify in a process pool; TRL generates with `model.generate` on the padded batch. entrorl's
`algo.skip_zero_advantage` (skip the learner compute of groups whose rewards are all equal, the
usual case for a 135M model on GSM8K) is off unless `--skip-zero-advantage`, so both learners do
the full forward + backward. Gradient checkpointing is off on both sides (GRPOConfig turns it on
by default; `--gradient-checkpointing` turns it on for both), and both workers run with
OMP_WAIT_POLICY=PASSIVE: on a shared 2-core machine, busy-waiting OpenMP threads made `generate`
2-4x slower and the timings noisy (`--omp-wait-policy ''` restores the default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

STARTED = time.perf_counter()  # process start (near enough): setup times include the imports
ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl"

# -- pure helpers (tested in tests/test_bench_vs_trl.py) ---------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` in `text` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
    return None


def to_number(text: str | None) -> Fraction | None:
    """The last number in an answer string ("$1,080.", "\\frac{3}{4}", "-2.5 km") as a Fraction."""
    if text is None:
        return None
    text = text.replace(",", "").replace("\\!", "")
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        value = Fraction(found[-1])
    except (ValueError, ZeroDivisionError):
        return None
    return value


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K solution (what follows `####`), thousands separators dropped."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def correct(completion: str, reference: str) -> float:
    """1.0 when the completion's last \\boxed{} holds the reference number, else 0.0."""
    got, want = to_number(last_boxed(completion)), to_number(reference)
    return float(got is not None and want is not None and got == want)


def first_eos_lengths(rows: list[list[int]], eos_ids: set[int]) -> list[int]:
    """Generated tokens of each row up to and including its first EOS (the whole row if none)."""
    lengths = []
    for row in rows:
        n = len(row)
        for k, token in enumerate(row):
            if token in eos_ids:
                n = k + 1
                break
        lengths.append(n)
    return lengths


def summarise(steps: list[dict], warmup: int) -> dict[str, float]:
    """Means over the steps after the first `warmup`: rates as total tokens / total seconds."""
    kept = steps[warmup:] or steps[-1:]
    total = {k: sum(s[k] for s in kept) for k in kept[0] if isinstance(kept[0][k], int | float)}
    n = len(kept)
    return {
        "steps_measured": n,
        "gen_tokens_per_s": total["gen_tokens"] / max(total["gen_s"], 1e-9),
        "learner_tokens_per_s": total["learner_tokens"] / max(total["learner_s"], 1e-9),
        "step_s": total["step_s"] / n,
        "gen_s": total["gen_s"] / n,
        "learner_s": total["learner_s"] / n,
        "reward_s": total["reward_s"] / n,
        "other_s": (total["step_s"] - total["gen_s"] - total["learner_s"] - total["reward_s"]) / n,
        "prompt_tokens": total["prompt_tokens"] / n,
        "gen_tokens": total["gen_tokens"] / n,
        "learner_tokens": total["learner_tokens"] / n,
        "reward_mean": total["reward_mean"] / n,
    }


# (key, label, format, which way is better) of the table's rows; the first four are the headline
ROWS = [
    ("gen_tokens_per_s", "generation tokens/s", "{:.1f}", "higher"),
    ("learner_tokens_per_s", "learner tokens/s", "{:.1f}", "higher"),
    ("step_s", "s / RL step", "{:.2f}", "lower"),
    ("peak_rss_mb", "peak RSS (MB)", "{:.0f}", "lower"),
    ("gen_s", "  generation s / step", "{:.2f}", "lower"),
    ("learner_s", "  learner s / step", "{:.2f}", "lower"),
    ("reward_s", "  reward (env) s / step", "{:.2f}", "lower"),
    ("other_s", "  other s / step", "{:.2f}", "lower"),
    ("prompt_tokens", "prompt tokens / step", "{:.0f}", ""),
    ("gen_tokens", "sampled tokens / step", "{:.0f}", ""),
    ("learner_tokens", "sequence tokens / step", "{:.0f}", ""),
    ("reward_mean", "mean reward", "{:.3f}", ""),
    ("setup_s", "setup s (start -> step 1)", "{:.1f}", "lower"),
]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def table(entrorl: dict[str, float], trl: dict[str, float]) -> str:
    """phase | entrorl | TRL | ratio (entrorl / TRL) | better, one line per row of ROWS."""
    header = ("phase", "entrorl", "TRL", "entrorl/TRL", "better")
    lines = []
    for key, label, fmt, better in ROWS:
        if key not in entrorl or key not in trl:
            continue
        a, b = entrorl[key], trl[key]
        r = f"{ratio(a, b):.2f}" if better and min(a, b) >= 0.01 else ("-" if better else "")
        lines.append((label, fmt.format(a), fmt.format(b), r, better))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


# -- the job both sides run ------------------------------------------------------------------------


def make_job(args: argparse.Namespace) -> dict:
    """Model path, the prompts (chat messages, rendered by entrorl's `boxed` format) and settings."""
    from agents.engines.models import resolve_model
    from agents.prompts import Boxed, Observation
    from environments.math_data import DEFAULT_DATA_DIR

    data_dir = Path(args.data_dir or DEFAULT_DATA_DIR)
    n = args.tasks * args.steps
    with open(data_dir / "math" / "gsm8k_train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    fmt = Boxed()
    prompts = [
        {"messages": fmt.messages(Observation(task=r["question"], text=r["question"])), "answer": r["answer"]}
        for r in rows
    ]
    return {
        "model": str(resolve_model(args.model)),
        "data_dir": str(data_dir),
        "prompts": prompts,
        "tasks": args.tasks,
        "group": args.group,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "lr": args.lr,
        "threads": args.threads,
        "seed": args.seed,
        "skip_zero_advantage": args.skip_zero_advantage,
        "gradient_checkpointing": args.gradient_checkpointing,
        "entrorl_set": args.entrorl_set,
    }


# -- entrorl worker (main .venv) ------------------------------------------------------------------


class _InOrder:
    """A task sampler giving task ids 0, 1, 2, ... in order (TRL's shuffle_dataset=False)."""

    def __init__(self) -> None:
        self.position = 0

    def next(self, n: int) -> list[int]:
        ids = list(range(self.position, self.position + n))
        self.position += n
        return ids


def entrorl_worker(job: dict, workdir: Path) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(job["threads"])
    from trainer.config import load
    from trainer.loop import Trainer

    overrides = [
        f"model.name={job['model']}",
        f"env.data_dir={job['data_dir']}",
        f"env.train.seeds=[0,{len(job['prompts'])}]",
        "env.train.level.split=all",  # task id i = line i of the file, as the TRL dataset
        f"train.steps={job['steps']}",
        f"train.tasks_per_step={job['tasks']}",
        f"algo.group_size={job['group']}",
        f"rollout.max_new_tokens={job['max_new_tokens']}",
        "sampling.temperature=1.0",
        "learner.temperature=1.0",
        f"learner.lr={job['lr']}",
        "learner.mini_batches=1",
        "learner.epochs=1",
        f"learner.threads={job['threads']}",
        "algo.aggregation.mode=token-mean",  # TRL loss_type=dapo: token mean over the batch
        f"algo.skip_zero_advantage={str(job['skip_zero_advantage']).lower()}",
        f"model.gradient_checkpointing={str(job['gradient_checkpointing']).lower()}",
        "train.device=cpu",
        f"train.seed={job['seed']}",
        "train.eval_before=false",
        "train.eval_after=false",
        "train.eval_every=0",
        "train.save_model=false",
        "train.save_every=0",
        "train.resume=never",
        f"train.output_dir={workdir / 'entrorl-run'}",
    ]
    cfg = load(ROOT / "configs" / "math" / "gsm8k_base.yaml", overrides + list(job["entrorl_set"]))
    trainer = Trainer(cfg, run_name="bench_vs_trl")
    trainer.sampler = _InOrder()
    # The reward (math-verify) runs while the rollout builds its samples, outside `time/env`: time it.
    reward_fn, reward_s = trainer.rollout.reward_fn, [0.0]

    def timed_reward(summary):
        t0 = time.perf_counter()
        try:
            return reward_fn(summary)
        finally:
            reward_s[0] += time.perf_counter() - t0

    trainer.rollout.reward_fn = timed_reward
    setup_s = time.perf_counter() - STARTED
    steps = []
    for step in range(1, job["steps"] + 1):
        reward_s[0] = 0.0
        t0 = time.perf_counter()
        m = trainer.step()
        step_s = time.perf_counter() - t0
        samples = trainer.last_samples
        env_s = m.get("time/env", 0.0)
        record = {
            "step_s": step_s,
            "gen_s": m["time/generate"],
            "gen_tokens": int(m["rollout/gen_tokens"]),
            "reward_s": env_s + reward_s[0],  # env steps + the reward function
            "reward_fn_s": reward_s[0],
            "learner_s": m["time/update"],
            "learner_tokens": int(m.get("learner/sequence_tokens", 0)),
            "compute_tokens": int(m.get("learner/compute_tokens", 0)),
            "prompt_tokens": sum(len(s.prompt_ids) for s in samples),
            "reward_mean": m["reward/mean"],
            "rollout_other_s": m["time/rollout"] - m["time/generate"] - env_s - reward_s[0],
            "advantage_s": m["time/advantage"],
            "sync_s": m["time/sync"],
        }
        steps.append(record)
        print(f"[entrorl] step {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in record.items()), flush=True)
    return {
        "steps": steps,
        "setup_s": setup_s,
        "peak_rss_mb": peak_rss_mb(),
        "children_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# -- TRL worker (.venv-trl) -----------------------------------------------------------------------


def trl_worker(job: dict, workdir: Path) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    counters = {
        "rollout_s": 0.0,
        "gen_s": 0.0,
        "gen_tokens": 0,
        "padded_gen_tokens": 0,
        "prompt_tokens": 0,
        "reward_s": 0.0,
    }
    rewards: list[float] = []

    def correctness(completions, answer, **_):
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [correct(t, gsm8k_reference(a)) for t, a in zip(texts, answer, strict=True)]
        rewards.extend(scores)
        counters["reward_s"] += time.perf_counter() - t0
        return scores

    dataset = Dataset.from_list([{"prompt": p["messages"], "answer": p["answer"]} for p in job["prompts"]])
    batch = job["tasks"] * job["group"]
    config = GRPOConfig(
        output_dir=str(workdir / "trl-run"),
        per_device_train_batch_size=batch,  # completions per step: tasks x group
        gradient_accumulation_steps=1,
        num_generations=job["group"],
        max_completion_length=job["max_new_tokens"],
        max_steps=job["steps"],
        num_iterations=1,
        learning_rate=job["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=job["gradient_checkpointing"],  # GRPOConfig defaults to True; entrorl to False
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        seed=job["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
        log_completions=False,
    )
    trainer = GRPOTrainer(model=job["model"], reward_funcs=correctness, args=config, train_dataset=dataset)
    model = trainer.model
    eos_ids = set()
    for source in (model.generation_config, trainer.processing_class):
        eos = getattr(source, "eos_token_id", None)
        eos_ids.update([eos] if isinstance(eos, int) else (eos or []))
    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        counters["gen_s"] += time.perf_counter() - t0
        prompt_len = kw["input_ids"].shape[1]
        rows = out[:, prompt_len:].tolist()
        counters["gen_tokens"] += sum(first_eos_lengths(rows, eos_ids))
        counters["padded_gen_tokens"] += sum(len(r) for r in rows)
        counters["prompt_tokens"] += int(kw["attention_mask"].sum())
        return out

    model.generate = timed_generate
    # The rollout phase (prompts -> completions -> rewards -> advantages); the rest of a step is
    # the learner's (forward, loss, backward, optimizer step).
    generate_and_score = trainer._generate_and_score_completions

    def timed_generate_and_score(*a, **kw):
        t0 = time.perf_counter()
        out = generate_and_score(*a, **kw)
        counters["rollout_s"] += time.perf_counter() - t0
        return out

    trainer._generate_and_score_completions = timed_generate_and_score
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for k in counters:
                counters[k] = type(counters[k])(0)
            rewards.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.perf_counter() - self.t0
            learner_s = step_s - counters["rollout_s"]
            record = {
                "step_s": step_s,
                "gen_s": counters["gen_s"],
                "gen_tokens": counters["gen_tokens"],
                "padded_gen_tokens": counters["padded_gen_tokens"],
                "reward_s": counters["reward_s"],
                "learner_s": learner_s,
                "rollout_other_s": counters["rollout_s"] - counters["gen_s"] - counters["reward_s"],
                "learner_tokens": counters["prompt_tokens"] + counters["gen_tokens"],
                "prompt_tokens": counters["prompt_tokens"],
                "reward_mean": sum(rewards) / max(len(rewards), 1),
            }
            steps.append(record)
            print(
                f"[trl] step {state.global_step}: " + ", ".join(f"{k} {v:.3g}" for k, v in record.items()),
                flush=True,
            )

    trainer.add_callback(Timer())
    setup_s = time.perf_counter() - STARTED
    trainer.train()
    return {
        "steps": steps,
        "setup_s": setup_s,
        "peak_rss_mb": peak_rss_mb(),
        "children_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "log_history": trainer.state.log_history,
    }


# -- driver ---------------------------------------------------------------------------------------


def run_worker(
    kind: str, python: str, job_path: Path, result_path: Path, threads: int, wait_policy: str
) -> dict:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"
    )
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    # DeepSpeed JIT-builds its CPU comm op with the first `ninja` on PATH: use the venv's (shared cache)
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT) if kind == "entrorl" else ""
    cmd = [
        python,
        str(Path(__file__).resolve()),
        f"--{kind}-worker",
        str(job_path),
        "--result",
        str(result_path),
    ]
    print(f"== {kind}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="entrorl model name or HF folder")
    parser.add_argument(
        "--tasks", type=int, default=4, help="prompts per RL step (TRL: batch / num_generations)"
    )
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (TRL: num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="TRL: max_completion_length")
    parser.add_argument("--steps", type=int, default=4, help="RL steps (= optimizer steps) per side")
    parser.add_argument(
        "--warmup", type=int, default=1, help="first steps of each side left out of the means"
    )
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both workers")
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of both workers ('' = the OpenMP default, busy-waiting): on a shared 2-core "
        "machine spinning threads made generation 2-4x slower and noisy",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="on both sides (default off on both)"
    )
    parser.add_argument(
        "--entrorl-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra entrorl config override (repeatable), e.g. learner.share_prefix=false",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", default="", help="folder holding math/gsm8k_train.jsonl (default ../shared/data)"
    )
    parser.add_argument(
        "--skip-zero-advantage", action="store_true", help="let entrorl skip all-equal-reward groups"
    )
    parser.add_argument("--only", choices=["entrorl", "trl"], default=None, help="run one side (no table)")
    parser.add_argument(
        "--trl-first",
        action="store_true",
        help="run TRL before entrorl (to see the order's effect on a busy machine)",
    )
    parser.add_argument("--skip-setup", action="store_true", help="do not run scripts/setup_trl first")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--entrorl-worker", metavar="JOB", help=argparse.SUPPRESS)
    parser.add_argument("--trl-worker", metavar="JOB", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    for kind, worker in (("entrorl", entrorl_worker), ("trl", trl_worker)):
        job_file = getattr(args, f"{kind}_worker")
        if job_file:
            job = json.loads(Path(job_file).read_text())
            result = worker(job, Path(job_file).parent)
            Path(args.result).write_text(json.dumps(result, default=str))
            return

    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    wall = time.perf_counter()
    load_before = load_avg()
    if not args.skip_setup and args.only != "entrorl":
        subprocess.run([str(ROOT / "scripts" / "setup_trl")], check=True)
    job = make_job(args)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        pythons = {"entrorl": sys.executable, "trl": str(TRL_VENV / "bin" / "python")}
        for kind in ("trl", "entrorl") if args.trl_first else ("entrorl", "trl"):
            if args.only in (None, kind):
                result_path = Path(tmp) / f"{kind}.json"
                results[kind] = run_worker(
                    kind, pythons[kind], job_path, result_path, args.threads, args.omp_wait_policy
                )
    summaries = {}
    for kind, result in results.items():
        summaries[kind] = summarise(result["steps"], args.warmup)
        summaries[kind].update(peak_rss_mb=result["peak_rss_mb"], setup_s=result["setup_s"])
    report = {
        "settings": {k: v for k, v in job.items() if k != "prompts"},
        "trl_version": results.get("trl", {}).get("trl"),
        "order": list(results),
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "wall_s": time.perf_counter() - wall,
        "summary": summaries,
        "ratio_entrorl_over_trl": {},
        "results": results,
    }
    print()
    print(
        f"model {job['model']} | {args.tasks} prompts x group {args.group} | {args.max_new_tokens} new tokens | "
        f"{args.steps} steps (step 1..{args.warmup} = warm-up, dropped; means over steps {args.warmup + 1}..{args.steps}) | "
        f"{args.threads} torch threads, OMP_WAIT_POLICY={args.omp_wait_policy or 'default'} | TRL {report['trl_version']}"
    )
    if len(summaries) == 2:
        e, t = summaries["entrorl"], summaries["trl"]
        report["ratio_entrorl_over_trl"] = {
            key: ratio(e[key], t[key]) for key, *_ in ROWS if key in e and key in t
        }
        prompt_match = [
            (a["prompt_tokens"], b["prompt_tokens"])
            for a, b in zip(results["entrorl"]["steps"], results["trl"]["steps"], strict=False)
        ]
        report["prompt_tokens_per_step"] = prompt_match
        print(table(e, t))
        same = all(a == b for a, b in prompt_match)
        print(
            f"prompt tokens per step (entrorl, TRL): {prompt_match} -> {'identical' if same else 'DIFFERENT'}"
        )
    else:
        for kind, s in summaries.items():
            print(kind, json.dumps(s, indent=1))
    print(
        f"load average before {load_before}, after {report['load_avg_after']}; wall {report['wall_s']:.0f} s"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
