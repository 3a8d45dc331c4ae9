"""`entrorl` command line: train, eval.

    entrorl train configs/quickstart.yaml [key=value ...]
    entrorl eval  configs/quickstart.yaml [key=value ...]

The last line either command prints is one JSON object with the run's summary metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from trainer.config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entrorl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a policy"), ("eval", "evaluate a policy on the eval tasks")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML file with deltas over the defaults")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=2")
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    try:
        cfg = load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"entrorl: {exc}", file=sys.stderr)
        return 2
    from trainer.loop import Trainer

    trainer = Trainer(cfg, run_name=Path(args.config).stem, with_learner=args.command == "train")
    if args.command == "train":
        summary = trainer.train()
    else:
        summary = {"eval/success": trainer.evaluate(step=0)["eval/success"]}
    if trainer.rank == 0:
        print(json.dumps(summary), flush=True)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
