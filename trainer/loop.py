"""The training loop, top to bottom: tasks -> rollout -> rewards -> advantages -> update -> sync.

Every rank runs this same code (SPMD under the `deepspeed` launcher): it owns an inference engine
and a shard of each step's task groups; the learner is one DeepSpeed engine over all ranks.
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from agents.engines.hf import HFEngine
from agents.engines.models import resolve_model
from agents.rollout import Rollout, RolloutResult
from agents.tasks import TaskSampler, make_group_tasks, materialise
from agents.types import Trajectory
from trainer.advantages import ADVANTAGES, AdvantageInputs
from trainer.batch import response_tensors
from trainer.config import Config, to_yaml
from trainer.logging import RunLogger


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compute_advantages(samples: list[Trajectory], cfg: Config) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Registered estimator over this rank's samples (groups are whole on one rank)."""
    if not samples:
        return [], {}
    loss_mask, entropies = response_tensors(samples)
    inputs = AdvantageInputs(
        rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32),
        group_ids=torch.tensor([s.group_id for s in samples]),
        traj_ids=torch.tensor([s.traj_id for s in samples]),
        loss_mask=loss_mask,
        entropies=entropies,
    )
    out = ADVANTAGES.build(cfg.algo.advantage.name, cfg.algo.advantage.params)(inputs)
    rows = [out.advantages[i, : len(s.response_ids)] for i, s in enumerate(samples)]
    return rows, out.metrics


class Trainer:
    def __init__(self, cfg: Config, run_name: str = "run", with_learner: bool = True):
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        model_path = resolve_model(cfg.model.name)
        self.learner = None
        if with_learner:  # `entrorl eval` needs no optimizer, no DeepSpeed
            from trainer.learner.deepspeed import DeepSpeedLearner

            self.learner = DeepSpeedLearner(cfg, model_path)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        seed_everything(cfg.train.seed + 1000 * self.rank)  # ranks sample different episodes
        self.engine = HFEngine.from_pretrained(model_path, device=cfg.train.device)
        self.rollout = Rollout(self.engine, self.engine.tokenizer, cfg.rollout)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(cfg.train.output_dir or f"runs/{run_name}-{stamp}")
        self.logger = RunLogger(self.run_dir, enabled=self.rank == 0)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.sampler = TaskSampler(list(range(*cfg.env.train.seeds)), cfg.train.seed)

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        summary: dict[str, float] = {}
        if cfg.train.eval_before:
            summary["eval/success_before"] = self.evaluate(step=0)["eval/success"]
        for step in range(1, cfg.train.steps + 1):
            metrics = self.step()
            self.logger.log(step, metrics, cfg.train.steps)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                self.evaluate(step)
        if cfg.train.eval_after:
            summary["eval/success_after"] = self.evaluate(step=cfg.train.steps)["eval/success"]
        summary["train/steps"] = float(cfg.train.steps)
        if cfg.train.save_model:
            self.learner.save_pretrained(str(self.run_dir / "model"), self.engine.tokenizer)
        self._write_summary(summary)
        return summary

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        started = time.perf_counter()
        seeds = self.sampler.next(cfg.train.tasks_per_step)[self.rank :: self.world]
        picked = materialise(cfg.env.id, seeds, cfg.env.level)
        tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, picked, cfg.algo.group_size)
        result = self.rollout.run(tasks, cfg.sampling)
        t_rollout = time.perf_counter()
        advantages, adv_metrics = compute_advantages(result.samples, cfg)
        t_adv = time.perf_counter()
        update_metrics = self.learner.update(result.samples, advantages)
        update_metrics.update(self._update_controllers())
        t_update = time.perf_counter()
        self.engine.load_weights(self.learner.named_weights())
        t_sync = time.perf_counter()
        metrics = {**result.metrics, **adv_metrics, **update_metrics, **_reward_metrics(result)}
        metrics.update(
            {
                "time/rollout": t_rollout - started,
                "time/advantage": t_adv - t_rollout,
                "time/sync": t_sync - t_update,
                "time/step": t_sync - started,
            }
        )
        return _mean_over_ranks(metrics)

    def _update_controllers(self) -> dict[str, float]:
        """Advance every loss-term controller with the step's statistics (already reduced over
        micro-batches and ranks, so every rank makes the same update); log their new values."""
        stats = self.learner.controller_stats
        metrics: dict[str, float] = {}
        if not stats:  # nothing was trained this step
            return metrics
        for name, controller in self.learner.controllers.items():
            controller.update(stats)
            for key, value in controller.loss_kwargs().items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"ctrl/{name}/{key}"] = float(value)
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        shard = materialise(cfg.env.id, list(range(*cfg.env.eval.seeds))[self.rank :: self.world], cfg.env.level)
        tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, shard, cfg.env.eval.samples_per_task)
        result = self.rollout.run(tasks, cfg.train.eval_sampling, seed=cfg.train.seed + step)
        episodes = [s for s in result.samples if s.turn_idx in (None, 0)]
        wins = torch.tensor([sum(bool(s.info["won"]) for s in episodes), len(episodes)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(wins)
        metrics = {
            "eval/success": float(wins[0] / max(wins[1], 1)),
            "eval/episodes": float(wins[1]),
            "eval/invalid_rate": result.metrics["rollout/invalid_rate"],
            "eval/turns": result.metrics["rollout/turns"],
        }
        self.logger.log(step, metrics)
        return metrics

    def _write_summary(self, summary: dict[str, float]) -> None:
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _reward_metrics(result: RolloutResult) -> dict[str, float]:
    rewards = [s.reward for s in result.samples if s.turn_idx in (None, 0)]
    return {"reward/mean": sum(rewards) / max(len(rewards), 1)}


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, values)}
