"""Supervised fine-tuning: behaviour cloning of demonstrations, before RL or on its own.

    entrorl sft   CONFIG [key=value ...]    # SFT alone; the model lands in <output_dir>/model
    entrorl train CONFIG sft.source=expert  # an SFT stage (<output_dir>/sft), then the RL steps

An SFT run is the RL `Trainer` with another step: the same DeepSpeed learner (ZeRO stages,
packing, LoRA) trained on the `nll` loss, the same checkpoints, resume, metrics, evaluation and
HF export. Its data (`sft.source`):

  expert   each env's walkthrough played through the rollout loop by the expert agent with the
           policy's tokenizer (`agents/rollout.py`): the prompts are rendered as for the model
           and each action is the format's reply for it, so a demonstration is token for token
           the sample RL would train on had the model chosen those actions; the loss is on the
           action tokens. Only won episodes are kept.
  a path   a JSONL or Parquet file of OpenAI-format chats (`agents/chat_data.py`), loss on
           assistant turns.

Each step draws `sft.batch_size` samples from shuffled passes over the data (`TaskSampler` over
sample indices: a resume continues mid-pass exactly) and takes one optimizer step.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from datetime import datetime
from pathlib import Path

import torch

from agents.rollout import Rollout
from agents.tasks import TaskSampler, make_group_tasks, materialise
from agents.types import Trajectory
from trainer.config import AlgoConfig, Config, NamedConfig, task_level
from trainer.device import global_rank
from trainer.loop import Trainer, _mean_over_ranks
from trainer.progress import Progress

EXPERT = "expert"


class DemonstrationError(ValueError):
    """The SFT data could not be made (a bad chat line or row, an expert that wins nothing); says the fix."""


def sft_config(cfg: Config, output_dir: str, eval_before: bool, eval_after: bool, eval_random: bool = False) -> Config:
    """The config an SFT run trains with: the `nll` loss and nothing else in the objective, the
    sft.* schedule, one optimizer step per step; model, learner sizes, rollout and eval as given."""
    sft = cfg.sft
    return dataclasses.replace(
        cfg,
        algo=AlgoConfig(group_size=1, loss=NamedConfig("nll"), skip_zero_advantage=False),
        learner=dataclasses.replace(
            cfg.learner,
            lr=sft.lr,
            lr_scheduler=sft.lr_scheduler,
            warmup_steps=sft.warmup_steps,
            mini_batches=1,
            epochs=1,
        ),
        train=dataclasses.replace(
            cfg.train,
            steps=sft.steps,
            output_dir=output_dir,
            eval_before=eval_before,
            eval_after=eval_after,
            eval_random=eval_random,
            eval_every=0,
            max_staleness=0,
        ),
    )


class SFTTrainer(Trainer):
    """`Trainer` whose step is one supervised optimizer step on a batch of demonstrations."""

    def _describe_sizes(self) -> str:
        cfg = self.cfg
        return (
            f"sft | ranks {self.world} | {cfg.train.steps} optimizer steps x {cfg.sft.batch_size} samples "
            f"| lr {cfg.learner.lr} ({cfg.learner.lr_scheduler}) | micro-batch {cfg.learner.micro_batch_tokens} "
            f"tokens | ZeRO-{cfg.learner.zero_stage}"
        )

    def _make_sampler(self) -> TaskSampler:
        started = time.perf_counter()
        self.samples, info = demonstrations(self.cfg, self.engine.tokenizer)
        self.logger.info(
            f"sft: {len(self.samples)} samples, {sum(s.num_sampled_tokens for s in self.samples)} target tokens "
            f"from {info} in {time.perf_counter() - started:.1f}s"
        )
        return TaskSampler(list(range(len(self.samples))), self.cfg.train.seed)

    def step(self) -> dict[str, float]:
        started = time.perf_counter()
        picked = self.sampler.next(self.cfg.sft.batch_size)[self.rank :: self.world]
        batch = [self.samples[i] for i in picked]
        ones = [torch.ones(len(s.response_ids)) for s in batch]
        metrics = self.learner.update(batch, ones)
        # the engine's log-probs of a demonstration are not a behaviour policy: no mismatch to report
        metrics = {k: v for k, v in metrics.items() if not k.startswith("off_policy/")}
        metrics["sft/epoch"] = self.sampler.epoch + self.sampler.position / len(self.samples)
        metrics["sft/target_tokens"] = float(sum(s.num_sampled_tokens for s in batch))
        metrics["time/step"] = time.perf_counter() - started
        return _mean_over_ranks(metrics)


def demonstrations(cfg: Config, tokenizer) -> tuple[list[Trajectory], str]:
    """The SFT samples of `sft.source` and a line saying where they came from."""
    source = cfg.sft.source
    if source == EXPERT:
        return expert_samples(cfg, tokenizer)
    from agents.chat_data import ChatDataError, chat_samples

    try:
        samples = chat_samples(source, tokenizer, cfg.rollout.chat_template_kwargs, cfg.sft.max_tokens)
    except (ChatDataError, FileNotFoundError) as exc:
        raise DemonstrationError(f"sft.source: {exc}") from None
    return samples, source


def expert_samples(cfg: Config, tokenizer) -> tuple[list[Trajectory], str]:
    """Every task of sft.seeds (default env.train.seeds) played once by the expert agent with
    `tokenizer`: the won episodes' samples (step-wise: one per turn; trajectory: one each)."""
    seeds = cfg.sft.seeds or cfg.env.train.seeds
    picked = materialise(cfg.env.id, list(range(*seeds)), task_level(cfg.env, cfg.env.train))
    tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, picked, 1)
    rollout_cfg = dataclasses.replace(
        cfg.rollout, agent=EXPERT, branch=dataclasses.replace(cfg.rollout.branch, policy="none")
    )
    rollout = Rollout(None, tokenizer, rollout_cfg)
    try:
        with Progress("sft demonstrations", total=len(tasks), enabled=global_rank() == 0).on(rollout):
            result = rollout.run(tasks, cfg.train.eval_sampling)
    finally:
        rollout.close()
    won = {e["traj_id"] for e in result.episodes if e["won"]}
    if not won:
        lost = sorted({f"{e['stop_reason']}: {e['error'] or ''}" for e in result.episodes})[:5]
        raise DemonstrationError(
            f"sft.source=expert: the expert won none of {len(tasks)} tasks of {cfg.env.id} {list(seeds)} "
            f"under rollout.max_turns={cfg.rollout.max_turns} ({'; '.join(lost)}); raise rollout.max_turns "
            "or check that the env gives walkthroughs"
        )
    samples = [s for s in result.samples if s.traj_id in won]
    return samples, f"{len(won)} of {len(tasks)} expert episodes won ({cfg.env.id} tasks {list(seeds)})"


def run_sft(cfg: Config, run_name: str) -> dict[str, float]:
    """`entrorl sft`: SFT alone, evaluated before and after as train.eval_before/after say."""
    output = cfg.train.output_dir or _default_dir(run_name)
    trainer = SFTTrainer(
        sft_config(cfg, output, cfg.train.eval_before, cfg.train.eval_after, cfg.train.eval_random),
        run_name=run_name,
    )
    return trainer.train()


def run_sft_then_rl(cfg: Config, run_name: str) -> dict[str, float]:
    """`entrorl train` with sft.source set: the SFT stage in <run>/sft (skipped when a previous
    run finished it), then RL from its model in <run>. The summary has eval/success_before (the
    base model), eval/success_after_sft and eval/success_after."""
    run_dir = Path(cfg.train.output_dir or _default_dir(run_name))
    sft_dir = run_dir / "sft"
    done = sft_dir / "summary.json"
    if done.is_file():
        sft_summary = json.loads(done.read_text())
    else:
        stage = SFTTrainer(sft_config(cfg, str(sft_dir), cfg.train.eval_before, False), run_name=run_name)
        sft_summary = stage.train()
        del stage
        gc.collect()
    rl_cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name=str(sft_dir / "model")),
        train=dataclasses.replace(cfg.train, output_dir=str(run_dir), eval_before=True),
    )
    trainer = Trainer(rl_cfg, run_name=run_name)
    summary = trainer.train()
    merged = {}  # the stages in order: base, after SFT, after RL, then the rest
    if "eval/success_before" in sft_summary:
        merged["eval/success_before"] = sft_summary["eval/success_before"]
    merged["eval/success_after_sft"] = summary.pop("eval/success_before", float("nan"))
    merged.update(summary)
    merged["sft/steps"] = float(cfg.sft.steps)
    trainer._write_summary(merged)
    return merged


def _default_dir(run_name: str) -> str:
    return f"runs/{run_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
