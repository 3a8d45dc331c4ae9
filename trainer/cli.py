"""`entrorl` command line: train, eval.

    entrorl train configs/quickstart.yaml [key=value ...]
    entrorl sft   configs/quickstart.yaml sft.source=expert   # supervised warm start alone
    entrorl eval  configs/quickstart.yaml [key=value ...]
    entrorl eval  configs/quickstart.yaml agent=expert   # play the envs' walkthroughs, no model
    entrorl plot  RUN_DIR                                 # PNG curves into RUN_DIR/plots
    entrorl check-template MODEL [--format action_tag]    # token-exact appends vs a full render
    entrorl show-trajectory RUN_DIR/rollouts/step_000001_rank0.jsonl --index 3

The last line either command prints is one JSON object with the run's summary metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.config import ConfigError, load, task_level


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entrorl", description=__doc__.split("\n")[0])
    # the deepspeed launcher passes --local_rank before the subcommand (LOCAL_RANK is set too)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train a policy (after an SFT stage when sft.source is set)"),
        ("sft", "supervised fine-tuning on demonstrations (sft.source: expert or a JSONL/Parquet file)"),
        ("eval", "evaluate a policy on the eval tasks (agent=expert / agent=random: the envs' floors)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML file with deltas over the defaults")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=2")
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p = sub.add_parser("plot", help="write PNG curves of a run, or compare runs (a line per run)")
    p.add_argument("run_dir", nargs="+", help="run directories holding metrics.jsonl (several: compare them)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots; required to compare)")
    p = sub.add_parser("show-trajectory", help="print a saved sample with its masks, turns and entropies")
    p.add_argument("file", help="a rollouts/step_*.jsonl file (written with train.save_rollouts=true)")
    p.add_argument("--index", type=int, default=0, help="which sample of the file")
    p.add_argument("--model", default=None, help="tokenizer to decode with (default: the run's config)")
    p = sub.add_parser("check-template", help="do per-turn token appends equal a full chat-template render?")
    p.add_argument("model", help="a model name, HF folder or hub id (its tokenizer and chat template)")
    p.add_argument("--format", default="action_tag", help="agent format whose system prompt and prefill to use")
    p.add_argument(
        "--template-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="chat-template argument, e.g. enable_thinking=false (as rollout.chat_template_kwargs)",
    )
    args = parser.parse_args(argv)
    if args.command == "check-template":
        return _check_template(args.model, args.format, _template_kwargs(args.template_kwarg))
    if args.command == "plot":
        return _plot(args.run_dir, args.out)
    if args.command == "show-trajectory":
        return _show(args.file, args.index, args.model)
    try:
        # `agent=expert` is short for `rollout.agent=expert`
        cfg = load(args.config, [f"rollout.{o}" if o.startswith("agent=") else o for o in args.overrides])
    except (ConfigError, FileNotFoundError) as exc:
        print(f"entrorl: {exc}", file=sys.stderr)
        return 2
    try:
        from agents.tasks import check_env_kwargs

        check_env_kwargs(cfg.env.id, cfg.env.kwargs)
        if args.command == "sft" and not cfg.sft.source:
            raise ValueError(
                "entrorl sft needs sft.source: expert (the envs' walkthroughs) or a JSONL/Parquet file of chats"
            )
        if cfg.rollout.agent == "model":  # the expert and random agents load no model, use no device
            preflight(cfg, training=args.command != "eval")
    except (ValueError, KeyError) as exc:
        print(f"entrorl: {exc}", file=sys.stderr)
        return 2
    # DeepSpeed picks its accelerator at import: the one train.device names
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.train.device.startswith("cuda") else "cpu")
    if cfg.rollout.agent != "model":
        if args.command != "eval":
            print(
                f"entrorl: agent={cfg.rollout.agent} only evaluates (it loads no model); use `entrorl eval`",
                file=sys.stderr,
            )
            return 2
        print(json.dumps(agent_eval(cfg)), flush=True)
        return 0
    from trainer.loop import (
        ExportFailed,
        LearnerOutOfMemory,
        NonFiniteLoss,
        Preempted,
        Trainer,
        catch_sigterm,
    )

    training = args.command in ("train", "sft")
    if training:
        catch_sigterm()  # a SIGTERM while the model loads stops the run cleanly too

    finished = _finished_run(cfg) if training else None
    if finished is not None:  # never a second history in a finished run's folder
        print(
            f"entrorl: {cfg.train.output_dir} holds a finished run (summary.json): nothing to do. "
            "Set another train.output_dir for a new run, or train.resume=never to train over it",
            file=sys.stderr,
        )
        print(json.dumps(finished), flush=True)
        return 0

    run_name = Path(args.config).stem
    if training:
        from trainer.sft import DemonstrationError, run_sft, run_sft_then_rl

        try:
            if args.command == "sft":
                summary = run_sft(cfg, run_name)
            elif cfg.sft.source:
                summary = run_sft_then_rl(cfg, run_name)
            else:
                summary = Trainer(cfg, run_name=run_name).train()
        except DemonstrationError as exc:
            print(f"entrorl: {exc}", file=sys.stderr)
            return 2
        except (NonFiniteLoss, LearnerOutOfMemory) as exc:
            print(f"entrorl: {exc}", file=sys.stderr)
            return 3
        except ExportFailed as exc:
            print(f"entrorl: {exc}", file=sys.stderr)
            return 4
        except Preempted as exc:
            print(f"entrorl: {exc}", file=sys.stderr)
            return 143  # 128 + SIGTERM, as a process killed by it
    else:
        metrics = Trainer(cfg, run_name=run_name, with_learner=False).evaluate(step=0)
        summary = {k: metrics[k] for k in ("eval/success", "eval/infra_failures")}
    from trainer.device import global_rank

    if global_rank() == 0:
        print(json.dumps(summary), flush=True)
    return 0



def preflight(cfg, training: bool = True) -> None:
    """What this machine must have for the config, checked before any model or DeepSpeed
    loads: the device (CUDA present, a GPU per rank) and the engine (vLLM installed, a memory
    share that leaves the learner room). Raises ValueError naming the key and the fix."""
    from agents.engines import check_engine
    from trainer.device import resolve_device

    _check_model_path(cfg.model.name)
    device = str(resolve_device(cfg.train.device))
    check_engine(cfg.rollout.engine, device, dict(cfg.rollout.vllm), colocated=training)


def _finished_run(cfg) -> dict | None:
    """The summary of a finished run in train.output_dir, which a restart must not train again."""
    summary = Path(cfg.train.output_dir) / "summary.json" if cfg.train.output_dir else None
    if summary is None or cfg.train.resume == "never" or not summary.is_file():
        return None
    return json.loads(summary.read_text())


def _check_model_path(name: str) -> None:
    """A model.name written as a path (/..., ./..., ~/..., or a/b/c) must be a folder here; a
    hub id (org/name) or the embedded model's name is resolved later."""
    from agents.engines.models import DEFAULT_MODEL, EMBEDDED_MODELS

    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if name.lower() not in EMBEDDED_MODELS and looks_like_path and not Path(name).expanduser().is_dir():
        raise ValueError(
            f"model.name={name}: no such folder; give a local HF model folder (config.json + weights), "
            f"a hub id (org/name) where a hub is reachable, or {DEFAULT_MODEL} (the embedded default)"
        )


def agent_eval(cfg) -> dict[str, float]:
    """Play every eval task with a model-free agent through the rollout loop and env pool:
    `expert` (the walkthroughs: the ceiling under these turn limits, and a check of the env) or
    `random` (uniformly random valid commands: the floor a policy must clear)."""
    from agents.rollout import Rollout
    from agents.tasks import make_group_tasks, materialise

    level = task_level(cfg.env, cfg.env.eval)
    picked = materialise(cfg.env.id, list(range(*cfg.env.eval.seeds)), level)
    tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, picked, cfg.env.eval.samples_per_task)
    rollout = Rollout(None, None, cfg.rollout)
    try:
        result = rollout.run(tasks, cfg.train.eval_sampling, seed=cfg.train.seed)
    finally:
        rollout.close()
    for episode in result.episodes if cfg.rollout.agent == "expert" else []:
        if not episode["won"]:
            print(f"entrorl: expert lost {episode['task']}: {episode['stop_reason']} {episode['error'] or ''}",
                  file=sys.stderr)  # fmt: skip
    metrics = result.metrics
    summary = {f"eval/{k}": metrics[f"rollout/{k}"] for k in ("success", "episodes", "turns")}
    summary.update({k.replace("rollout/", "eval/"): v for k, v in metrics.items() if k.startswith("rollout/stop/")})
    return summary


def _template_kwargs(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings to a dict, values read as YAML (false -> False, 2 -> 2)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--template-kwarg {pair!r}: expected KEY=VALUE, e.g. enable_thinking=false")
        out[key] = yaml.safe_load(value)
    return out


def _check_template(model: str, format_name: str, template_kwargs: dict | None = None) -> int:
    """Exit 0 when appends equal the full render, 1 when they differ (the report says where)."""
    from transformers import AutoTokenizer

    from agents.engines.models import resolve_model
    from agents.rollout import check_format_template

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    equal, report = check_format_template(tokenizer, format_name, template_kwargs)
    print(f"{model} ({format_name}): {'OK' if equal else 'MISMATCH'} - {report}")
    return 0 if equal else 1


def _plot(run_dirs: list[str], out: str | None) -> int:
    from trainer.plot import plot_compare, plot_run

    if len(run_dirs) > 1 and out is None:
        print("entrorl plot: comparing runs needs --out DIR (where the PNGs go)", file=sys.stderr)
        return 2
    try:
        written = plot_compare(run_dirs, out) if len(run_dirs) > 1 else plot_run(run_dirs[0], out)
    except FileNotFoundError as exc:
        print(f"entrorl: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _show(file: str, index: int, model: str | None) -> int:
    from transformers import AutoTokenizer

    from agents.engines.models import resolve_model
    from trainer.show import load_sample, render

    try:
        sample = load_sample(file, index)
    except (FileNotFoundError, IndexError) as exc:
        print(f"entrorl: {exc}", file=sys.stderr)
        return 2
    if model is None:  # the run's config sits two levels up: <run>/rollouts/<file>
        model = load(Path(file).resolve().parents[1] / "config.yaml").model.name
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    print(render(sample, lambda ids: tokenizer.decode(ids, skip_special_tokens=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
