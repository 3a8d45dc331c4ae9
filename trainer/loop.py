"""The training loop, top to bottom: tasks -> rollout -> rewards -> advantages -> update -> sync.

Every rank runs this same code (SPMD under the `deepspeed` launcher): it owns an inference engine
and a shard of each step's task groups; the learner is one DeepSpeed engine over all ranks.

The parts that need no engine or learner live beside it: a batch's advantages in
`trainer/advantage_inputs.py`, DAPO group selection and overlong shaping over samples in
`trainer/dapo_batch.py`, the errors that stop a run and the SIGTERM handling in
`trainer/run_control.py`. The names the CLI and tests import from this module are imported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from agents.engines import make_engine
from agents.engines.base import weight_buckets
from agents.engines.models import resolve_model
from agents.rollout import Rollout, RolloutResult
from agents.tasks import TaskSampler, make_group_tasks, materialise
from agents.types import Trajectory
from trainer.advantage_inputs import compute_advantages, needs_critic
from trainer.checkpoint import Checkpointer, fsync_tree, is_write_failure
from trainer.config import (
    Config,
    NamedConfig,
    check_world,
    describe_sizes,
    task_level,
    to_yaml,
)
from trainer.dapo_batch import _merge_metrics, _shift_traj_ids, select_groups, shape_overlong
from trainer.device import all_gather_objects, any_rank, resolve_device
from trainer.evaluation import eval_metrics
from trainer.logging import RunLogger, disk_hint
from trainer.progress import Progress
from trainer.run_control import (
    ExportFailed,
    LearnerOutOfMemory,
    NonFiniteLoss,
    Preempted,
    _sigterm_flag,
    catch_sigterm,  # noqa: F401  (the CLI imports it from here)
)
from trainer.sampling import INFRA_FAILURES, infra_failed_episodes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, run_name: str = "run", with_learner: bool = True):
        self.cfg = cfg
        seed_everything(cfg.train.seed)
        model_path = resolve_model(cfg.model.name)
        self.learner = self.critic = None
        if with_learner:  # `entrorl eval` needs no optimizer, no DeepSpeed
            from trainer.learner.deepspeed import DeepSpeedLearner

            self.learner = DeepSpeedLearner(cfg, model_path)
            if needs_critic(cfg):
                from trainer.learner.critic import DeepSpeedCritic

                self.critic = DeepSpeedCritic(cfg, model_path)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        check_world(cfg, self.world)
        seed_everything(cfg.train.seed + 1000 * self.rank)  # ranks sample different episodes
        device = str(resolve_device(cfg.train.device))  # the learner's: cuda:LOCAL_RANK on GPUs
        # vLLM reseeds Python's, NumPy's and torch's global RNGs with its `seed` and samples
        # unseeded requests from it: the rank's seed keeps the ranks' streams apart, as above
        vllm_args = {"seed": cfg.train.seed + 1000 * self.rank, **cfg.rollout.vllm}
        self.engine = make_engine(
            cfg.rollout.engine,
            model_path,
            device,
            prefix_cache_mib=cfg.rollout.prefix_cache_mib,
            # the learner's compute dtype (DeepSpeed bf16 on GPU); fp32 on CPU, as the learner there
            hf_dtype=cfg.model.dtype if device.startswith("cuda") else "float32",
            **vllm_args,
        )
        self.rollout = Rollout(self.engine, self.engine.tokenizer, cfg.rollout)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(cfg.train.output_dir or f"runs/{run_name}-{stamp}")
        self.logger = RunLogger(
            self.run_dir,
            enabled=self.rank == 0,
            tensorboard=cfg.train.tensorboard,
            wandb=cfg.train.wandb,
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
        )
        self.logger.info(self._describe_sizes())
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.sampler = self._make_sampler()
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_checkpoints)
        # Last: a resume restores the RNG states, which everything above has consumed.
        self.summary: dict[str, float] = {}  # run-level results so far (checkpointed)
        self.start_step = self._resume() if with_learner else 0
        if with_learner:
            self._start_history()
        self.current_step = self.start_step  # the RL step in progress (1-based once training)
        self._synced_step = self.start_step  # the engine holds the weights after this step

    def _describe_sizes(self) -> str:
        return describe_sizes(self.cfg, self.world)

    def _make_sampler(self) -> TaskSampler:
        """What each step draws: the train task ids (an SFT run draws its samples instead)."""
        return TaskSampler(list(range(*self.cfg.env.train.seeds)), self.cfg.train.seed)

    def train(self) -> dict[str, float]:
        """Evaluate, train, evaluate, export. A SIGTERM at any point (a scheduler's preemption)
        lets the phase in progress finish, then stops with a checkpoint that a restart resumes."""
        cfg = self.cfg
        summary = self.summary
        nonfinite = 0  # consecutive steps whose update was skipped for a NaN/inf loss
        with _sigterm_flag() as sigterm:
            if any_rank(sigterm.is_set()):  # while the model loaded: nothing new to save
                raise Preempted("SIGTERM before training started: run the same command again")
            if cfg.train.eval_before and self.start_step == 0:
                summary["eval/success_before"] = self.evaluate(step=0)["eval/success"]
                if any_rank(sigterm.is_set()):
                    raise Preempted("SIGTERM during the first evaluation, before any training: run the same command again")
            for step in range(self.start_step + 1, cfg.train.steps + 1):
                nonfinite = self._train_step(step, nonfinite)
                if any_rank(sigterm.is_set()):  # every rank stops after the same step
                    self._stop_on_sigterm(step)
            if cfg.train.eval_after and "eval/success_after" not in summary:  # not done before a resume
                summary["eval/success_after"] = self.evaluate(step=cfg.train.steps)["eval/success"]
                if any_rank(sigterm.is_set()):
                    self._stop_on_sigterm(cfg.train.steps, "during the final evaluation")
            if cfg.train.eval_random and "eval/success_random" not in summary:
                summary["eval/success_random"] = self.evaluate(cfg.train.steps, agent="random")["eval/random/success"]
            summary["train/steps"] = float(cfg.train.steps)
            if cfg.train.save_model:  # a SIGTERM now lets the export finish: the run is done after it
                self._export(self.run_dir / "model")
        self._write_summary(summary)  # last: summary.json marks a finished run
        self.logger.close()
        return summary

    def _stop_on_sigterm(self, step: int, where: str = "") -> None:
        latest = self.checkpointer.latest()
        if latest is None or latest.name != f"step_{step:08d}":  # not saved by _train_step
            self._checkpoint(step, force=True)
        raise Preempted(
            f"SIGTERM: stopped after step {step}{' ' + where if where else ''} with a checkpoint in "
            f"{self.checkpointer.root}; run the same command (same train.output_dir) to resume"
        )

    def _train_step(self, step: int, nonfinite: int) -> int:
        """One RL step with its logging, NaN accounting, eval and checkpoint; returns the count
        of consecutive non-finite steps."""
        cfg = self.cfg
        self.current_step = step
        metrics = self.step()
        self.logger.log(step, metrics, cfg.train.steps)
        if cfg.train.save_rollouts:
            save_samples(self.run_dir / "rollouts" / f"step_{step:06d}_rank{self.rank}.jsonl", self.last_samples,
                         self.last_advantages)  # fmt: skip
        nonfinite = nonfinite + 1 if metrics.get("learner/nonfinite_steps") else 0
        if nonfinite >= cfg.train.max_nonfinite_steps:
            self._checkpoint(step, force=True)  # the weights are intact: skipped steps never applied
            raise NonFiniteLoss(
                f"{nonfinite} consecutive steps had a NaN/inf loss or gradient (up to step {step}); "
                f"the run stopped with a checkpoint in {self.checkpointer.root}. Lower learner.lr, "
                "check rewards/advantages for NaN, or raise train.max_nonfinite_steps"
            )
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            self.evaluate(step)
        self._checkpoint(step)
        return nonfinite

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, step: int, force: bool = False) -> bool:
        """Save if this step is due (or `force`); True when a checkpoint of `step` was written."""
        every, last = self.cfg.train.save_every, self.cfg.train.steps
        if not force and (not every or (step % every and step != last)):
            return False
        state = {
            "sampler": self.sampler.state_dict(),
            "learner": self.learner.state_dict_extra(),
            "summary": dict(self.summary),  # eval/success_before must survive a resume
        }
        try:
            path = self.checkpointer.save(step, self.learner, state, critic=self.critic)
        except (OSError, RuntimeError) as exc:  # disk full, quota, ...: the previous one is complete
            if not is_write_failure(exc):
                raise
            latest = self.checkpointer.latest()
            self.logger.info(
                f"[red]checkpoint at step {step} failed ({str(exc).splitlines()[0][:200]}); "
                f"{'the previous one, ' + latest.name + ', is kept' if latest else 'no checkpoint is kept yet'}. "
                f"{disk_hint(self.checkpointer.root.parent, exc)}[/red]"
            )
            return False
        self.logger.info(f"checkpoint: {path}")
        if self._synced_step != step:  # off-policy lag: a resume starts in sync, so must this run
            self._sync_engine()
        return True

    def _resume(self) -> int:
        """Restore the newest complete checkpoint (train.resume=auto) or the one named; return
        its step (0 = fresh start)."""
        mode = self.cfg.train.resume
        if mode == "never":
            return 0
        path = self.checkpointer.latest() if mode == "auto" else Path(mode)
        if path is None:
            return 0
        state = self.checkpointer.load(path, self.learner, critic=self.critic)
        self.sampler.load_state_dict(state["sampler"])
        self.learner.load_state_dict_extra(state["learner"])
        self.summary = dict(state.get("summary", {}))
        self._load_learner_weights()
        self.logger.info(f"resumed from {path} (step {state['step']})")
        return int(state["step"])

    def _start_history(self) -> None:
        """metrics.jsonl holds each step once: a resumed run plays the steps after its
        checkpoint again, and a fresh start in a folder with a history starts a new one; the
        records they replace move to metrics.discarded.jsonl (kept, never appended twice)."""
        moved = self.logger.discard_after(self.start_step)
        if moved:
            self.logger.info(
                f"metrics.jsonl: {moved} record(s) of steps after {self.start_step} moved to "
                "metrics.discarded.jsonl (this run plays them again)"
            )

    def _export(self, folder: Path) -> None:
        """The policy as a plain HF folder, replaced atomically (a kill never leaves half a model).
        A failed write (full disk) removes the partial folder and raises ExportFailed, saying
        which checkpoint a restart finishes from."""
        tmp = folder.with_name(f".{folder.name}.tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.learner.save_pretrained(str(tmp), self.engine.tokenizer)
            if self.rank == 0:
                fsync_tree(tmp)
        except (OSError, RuntimeError) as exc:
            if not is_write_failure(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            latest = self.checkpointer.latest()
            after = (
                f"run the same command: it resumes from {latest} and writes the model"
                if latest is not None and latest.name == f"step_{self.cfg.train.steps:08d}"
                else "no checkpoint of the last step was kept (train.save_every=0), so the trained "
                "weights are lost with this process: set train.save_every to keep them next time"
            )
            raise ExportFailed(
                f"the trained model could not be written to {folder} ({str(exc).splitlines()[0][:200]}). "
                f"{disk_hint(folder.parent, exc)} Then {after}."
            ) from None
        if self.rank == 0:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        started = time.perf_counter()
        result = self._collect() if cfg.algo.dynamic_sampling else self._rollout_batch(0, 0)
        result.metrics.update(shape_overlong(result.samples, cfg.algo.overlong))
        self._observe_rollout(result.metrics)
        t_rollout = time.perf_counter()
        values = self.critic.values(result.samples) if self.critic is not None else None
        reference = (
            self.learner.reference_logprobs(result.samples) if cfg.algo.kl_in_reward.coef > 0 else None
        )
        advantages, adv_metrics, returns = compute_advantages(result.samples, cfg, values, reference)
        self.last_samples, self.last_advantages = result.samples, advantages
        first_traj = 1 + max((s.traj_id for s in result.samples), default=-1)
        extra, extra_rows, extra_metrics = self._temperature_extras(first_traj)
        adv_metrics.update(extra_metrics)
        if extra:  # after the main advantages: the extras bring their own (+1)
            self.last_samples, self.last_advantages = result.samples + extra, advantages + extra_rows
        t_adv = time.perf_counter()
        slept = self._engine_sleep()  # colocated vLLM frees its memory for the update
        update_metrics = self._update(self.last_samples, self.last_advantages)
        if self.critic is not None:
            update_metrics.update(self.critic.update(result.samples, returns, values))
        if slept:
            if torch.cuda.is_available():  # the learner's freed blocks back to the driver, for vLLM
                torch.cuda.empty_cache()
            self.engine.wake()  # weights back first, then the KV cache
        update_metrics.update(self._update_controllers())
        t_update = time.perf_counter()
        staleness = self.current_step - 1 - self._synced_step  # updates the rollout's weights lagged
        if self.current_step % (cfg.train.max_staleness + 1) == 0:
            self._sync_engine()
        t_sync = time.perf_counter()
        metrics = {**result.metrics, **adv_metrics, **update_metrics, **_reward_metrics(result)}
        metrics.update(
            {
                "time/rollout": t_rollout - started,
                "time/advantage": t_adv - t_rollout,
                "time/sync": t_sync - t_update,
                "time/step": t_sync - started,
                "rollout/staleness": float(max(staleness, 0)),
            }
        )
        return _mean_over_ranks(metrics)

    def _engine_sleep(self) -> bool:
        """Put an engine with a sleep mode (vLLM on GPU) to sleep; False where there is none.
        Level 1 keeps the weights in host memory: with train.max_staleness > 0 a step may end
        without a sync, and the engine must wake with the weights it had."""
        sleep = getattr(self.engine, "sleep", None)
        return bool(sleep(level=1)) if sleep is not None else False

    def _sync_engine(self) -> None:
        """The learner's weights into the rollout engine, one decoder layer at a time (whole
        modules, as vLLM's fused q/k/v need; under ZeRO-3 only a layer is gathered at once)."""
        self._load_learner_weights()
        self._synced_step = self.current_step

    def _load_learner_weights(self) -> None:
        for bucket in weight_buckets(self.learner.named_weights()):
            self.engine.load_weights(bucket)

    def _update(self, samples: list[Trajectory], advantages: list[torch.Tensor]) -> dict[str, float]:
        """The policy update (none while the critic warms up)."""
        cfg = self.cfg
        if self.critic is not None and self.current_step <= cfg.critic.warmup_steps:
            self.learner.controller_stats = {}  # no update: controllers must not step either
            return {"learner/critic_warmup": 1.0}
        try:
            return self.learner.update(samples, advantages)
        except torch.OutOfMemoryError as exc:  # before the optimizer step: the weights are intact
            raise LearnerOutOfMemory(
                f"the learner ran out of memory on this step's batch ({exc}). Lower "
                f"learner.micro_batch_tokens (now {cfg.learner.micro_batch_tokens}; the global batch "
                "stays the same), or set model.gradient_checkpointing=true, or a higher learner.zero_stage"
            ) from None

    def _rollout_batch(self, first_group: int, first_traj: int) -> RolloutResult:
        """Roll out this rank's share of the sampler's next `tasks_per_step` tasks, with group
        and trajectory ids starting at the given offsets."""
        cfg = self.cfg
        seeds = self.sampler.next(cfg.train.tasks_per_step)[self.rank :: self.world]
        picked = materialise(cfg.env.id, seeds, task_level(cfg.env, cfg.env.train))
        tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, picked, cfg.algo.group_size, first_group)
        with Progress("rollout", total=len(tasks), show_tokens=True, keep=False, enabled=self.rank == 0).on(self.rollout):
            result = self.rollout.run(tasks, cfg.sampling)
        _shift_traj_ids(result.samples, first_traj)
        self._last_picked = picked
        if cfg.train.exclude_infra_failures:
            failed = infra_failed_episodes([(s.traj_id, s.parent_id, s.stop_reason) for s in result.samples])
            result.samples = [s for s in result.samples if s.traj_id not in failed]
            result.metrics["rollout/excluded_episodes"] = float(len(failed))
        return result

    def _temperature_extras(
        self, first_traj: int
    ) -> tuple[list[Trajectory], list[torch.Tensor], dict[str, float]]:
        """Arbitrary-Entropy PO (arXiv 2510.08141): a quarter of this step's tasks played again
        at the controller's temperature (T_high below the entropy target, T_low above it); the
        samples with a GRPO advantage above the threshold (at most max_samples, halved above
        the target) join the batch with advantage +1, trained by the REINFORCE term only.
        Returns (samples, advantage rows, metrics); nothing without the regulariser."""
        switch = next((c for c in self.learner.controllers.values() if hasattr(c, "temperature")), None)
        if switch is None:
            return [], [], {}
        cfg = self.cfg
        picked = self._last_picked[: max(1, len(self._last_picked) // 4)]
        first_group = 1 + max((s.group_id for s in self.last_samples), default=0)
        tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, picked, cfg.algo.group_size, first_group)
        extra = self.rollout.run(tasks, dataclasses.replace(cfg.sampling, temperature=switch.temperature))
        _shift_traj_ids(extra.samples, first_traj)
        grpo = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, advantage=NamedConfig("grpo")))
        rows, _, _ = compute_advantages(extra.samples, grpo)
        # a GRPO row is one value on every sampled token
        scalars = [
            float(row[torch.tensor(s.loss_mask) > 0][:1].sum())
            for s, row in zip(extra.samples, rows, strict=True)
        ]
        chosen = switch.select(scalars)
        for i in chosen:
            extra.samples[i].reinforce = True
        kept = [extra.samples[i] for i in chosen]
        ones = [torch.tensor(s.loss_mask, dtype=torch.float32) for s in kept]
        metrics = {
            "reinforce/temperature": switch.temperature,
            "reinforce/played": float(len(extra.samples)),
            "reinforce/kept": float(len(kept)),
        }
        return kept, ones, metrics

    def _collect(self) -> RolloutResult:
        """DAPO dynamic sampling: generation batches until this rank has its share of groups with
        differing rewards, or `algo.max_gen_batches` batches. Every rank plays the same number of
        batches so the task samplers stay in step; a rank that has enough skips the rollout."""
        cfg = self.cfg
        target = len(range(self.rank, cfg.train.tasks_per_step, self.world))
        samples: list[Trajectory] = []
        batches: list[dict[str, float]] = []
        kept: list[int] = []
        while len(batches) < max(cfg.algo.max_gen_batches, 1):
            need = len(kept) < target
            if not any_rank(need):
                break
            if not need:
                self.sampler.next(cfg.train.tasks_per_step)
                batches.append({})
                continue
            first_traj = max((s.traj_id for s in samples), default=-1) + 1
            result = self._rollout_batch(len(batches) * cfg.train.tasks_per_step, first_traj)
            samples += result.samples
            batches.append(result.metrics)
            kept = select_groups(samples, target)[1]
        samples, kept = select_groups(samples, target)
        metrics = _merge_metrics([m for m in batches if m])
        metrics.update({"rollout/kept_groups": float(len(kept)), "rollout/gen_batches": float(len(batches))})
        return RolloutResult(samples, metrics)

    def _observe_rollout(self, metrics: dict[str, float]) -> None:
        """Controllers that read the rollout before the update (EPO's per-turn history) get
        its metrics, averaged over ranks so every rank's controller makes the same step."""
        observers = [c for c in self.learner.controllers.values() if hasattr(c, "observe_rollout")]
        if observers:
            reduced = _mean_over_ranks(metrics)
            for controller in observers:
                controller.observe_rollout(reduced)

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

    def evaluate(self, step: int, agent: str = "model") -> dict[str, float]:
        """Play the eval tasks (sharded over ranks) and log success with its interval, pass@k and
        maj@k when tasks have several samples, and success by task type / subject / level.
        `agent="random"` plays uniformly random valid commands instead of the policy (the floor
        a policy must clear), logged as eval/random/*."""
        cfg = self.cfg
        if agent != "model":
            rollout = Rollout(None, None, dataclasses.replace(cfg.rollout, agent=agent))
            try:
                metrics = self._play_eval(step, rollout)
            finally:
                rollout.close()
            metrics = {k.replace("eval/", f"eval/{agent}/", 1): v for k, v in metrics.items()}
            self.logger.log(step, metrics)
            return metrics
        if self.learner is not None and self._synced_step != self.current_step:  # off-policy lag
            self._sync_engine()
        metrics = self._play_eval(step, self.rollout)
        self.logger.log(step, metrics)
        return metrics

    def _play_eval(self, step: int, rollout: Rollout) -> dict[str, float]:
        cfg = self.cfg
        shard = materialise(
            cfg.env.id,
            list(range(*cfg.env.eval.seeds))[self.rank :: self.world],
            task_level(cfg.env, cfg.env.eval),
        )
        tasks = make_group_tasks(cfg.env.id, cfg.env.kwargs, shard, cfg.env.eval.samples_per_task)
        with Progress("eval", total=len(tasks), enabled=self.rank == 0).on(rollout):  # rank 0's share
            result = rollout.run(tasks, cfg.train.eval_sampling, seed=cfg.train.seed + step)
        summaries = _gather(result.episodes, self.world)
        metrics = eval_metrics(summaries, answer_of=lambda s: s.get("final_answer"))
        metrics["eval/invalid_rate"] = sum(s["parse_errors"] for s in summaries) / max(
            sum(s["turns"] for s in summaries), 1
        )
        metrics["eval/turns"] = sum(s["turns"] for s in summaries) / max(len(summaries), 1)
        # counted as losses in eval/success, and said: a crashing env must not read as a bad policy
        metrics["eval/infra_failures"] = float(sum(s["stop_reason"] in INFRA_FAILURES for s in summaries))
        if metrics["eval/infra_failures"]:
            errors = sorted({s["error"] for s in summaries if s["stop_reason"] in INFRA_FAILURES and s["error"]})
            self.logger.info(
                f"[red]eval: {metrics['eval/infra_failures']:.0f} of {len(summaries)} episodes ended by an env, "
                f"engine or timeout failure (counted as lost): {'; '.join(errors)[:500]}[/red]"
            )
        return metrics

    def _write_summary(self, summary: dict[str, float]) -> None:
        """summary.json, written whole or not at all (it marks a finished run)."""
        if self.rank != 0:
            return
        tmp = self.run_dir / ".summary.json.tmp"
        try:
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.run_dir / "summary.json")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.logger.info(
                f"[red]summary.json could not be written ({exc}); the results are in metrics.jsonl. "
                f"{disk_hint(self.run_dir, exc)}[/red]"
            )


def save_samples(path: Path, samples: list[Trajectory], advantages: list[torch.Tensor]) -> None:
    """One JSON line per sample (its fields plus its per-token advantages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for sample, advantage in zip(samples, advantages, strict=True):
            record = dataclasses.asdict(sample)
            record["advantages"] = [round(float(a), 5) for a in advantage]
            f.write(json.dumps(record) + "\n")


def _gather(items: list, world: int) -> list:
    """Every rank's list, concatenated in rank order (a collective when world > 1)."""
    if world == 1:
        return list(items)
    return [item for part in all_gather_objects(items) for item in part]


def _reward_metrics(result: RolloutResult) -> dict[str, float]:
    rewards = [s.reward for s in result.samples if s.turn_idx in (None, 0)]
    return {"reward/mean": sum(rewards) / max(len(rewards), 1)}


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over the ranks that report it. Ranks may report different keys
    (a stop reason or a turn index seen on one rank only), so the keys travel with the values."""
    gathered = all_gather_objects(metrics)
    if len(gathered) == 1:
        return metrics
    keys = sorted({k for m in gathered for k in m})
    return {k: sum(m[k] for m in gathered if k in m) / sum(k in m for m in gathered) for k in keys}
