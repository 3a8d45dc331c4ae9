"""The learner: one DeepSpeed engine that turns packed micro-batches into optimizer steps.

The only module that imports deepspeed. It knows the model and the optimizer; the math comes from
the registries (`trainer/losses.py`, `trainer/aggregation.py`, `trainer/logprobs.py`).

One update = every micro-batch of every mini-batch: forward (packed, no padding), logprobs of
sampled tokens only, the registered policy loss, aggregation with GLOBAL token/sequence counts
(so the gradient does not depend on how samples were split into micro-batches or ranks),
backward, and one optimizer step per mini-batch.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from agents.types import Trajectory
from trainer.aggregation import aggregate
from trainer.batch import MicroBatch, make_micro_batch, plan_by_prompt
from trainer.config import Config
from trainer.logprobs import logprobs_and_entropy_from_hidden
from trainer.losses import POLICY_LOSSES, LossInputs, masked_mean

# Losses whose per-token loss (and gradient) is exactly 0 where the advantage is 0, so samples
# with all-zero advantages can be skipped without changing the update.
_ZERO_AT_ZERO_ADVANTAGE = {"ppo_clip", "gspo"}


def init_distributed() -> None:
    """Join the process group the `deepspeed` launcher describes, or make a 1-rank one."""
    import deepspeed

    if dist.is_initialized():
        return
    # DeepSpeed JIT-builds a CPU comm op with the first `ninja` on PATH; prefer this venv's so a
    # system ninja does not rebuild (and invalidate) the shared extension cache on every switch.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def ds_config(cfg: Config) -> dict:
    learner = cfg.learner
    config = {
        "train_micro_batch_size_per_gpu": 1,  # our micro-batches are packed rows, sized by tokens
        "gradient_accumulation_steps": 1,  # we mark accumulation boundaries ourselves
        "gradient_clipping": learner.max_grad_norm,
        "zero_optimization": {"stage": learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if torch.cuda.is_available() and cfg.model.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}  # bf16 compute, fp32 master weights in the optimizer
    return config


class DeepSpeedLearner:
    def __init__(self, cfg: Config, model_path: str):
        import deepspeed
        from transformers import AutoModelForCausalLM

        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        init_distributed()
        self.cfg = cfg
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.learner.lr,
            betas=tuple(cfg.learner.betas),
            weight_decay=cfg.learner.weight_decay,
            foreach=True,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(cfg)
        )
        self.loss_fn = POLICY_LOSSES.build(cfg.algo.loss.name, cfg.algo.loss.params)
        self.world_size = dist.get_world_size()

    # -- one update -------------------------------------------------------------------------------

    def update(self, samples: list[Trajectory], advantages: list[torch.Tensor]) -> dict[str, float]:
        """Optimizer steps on this rank's samples; `advantages[i]` is sample i's [T_i] row."""
        self.engine.train()
        started = time.perf_counter()
        micro_totals: dict[str, float] = defaultdict(float)  # summed over micro-batches
        step_totals: dict[str, float] = defaultdict(float)  # summed over optimizer steps
        for _ in range(self.cfg.learner.epochs):
            for index in _split(len(samples), self.cfg.learner.mini_batches):
                batch = [samples[i] for i in index]
                self._mini_batch_step(batch, [advantages[i] for i in index], micro_totals, step_totals)
        elapsed = time.perf_counter() - started
        n_micro = max(micro_totals.pop("_micro_batches", 0.0), 1.0)
        n_steps = max(step_totals["learner/optimizer_steps"], 1.0)
        metrics = {k: v / n_micro for k, v in micro_totals.items() if not k.startswith("_")}
        metrics["learner/grad_norm"] = step_totals["learner/grad_norm"] / n_steps
        metrics["learner/optimizer_steps"] = step_totals["learner/optimizer_steps"]
        metrics["learner/skipped_samples"] = step_totals["learner/skipped_samples"]
        # Throughput in sequence tokens (each sample's prompt + response) per second; the model
        # runs fewer tokens than that when prompts are shared (`learner/compute_tokens`).
        metrics["learner/tokens_per_s"] = step_totals["sequence_tokens"] / max(elapsed, 1e-9)
        metrics["learner/compute_tokens"] = micro_totals["_tokens"]
        metrics["learner/sequence_tokens"] = step_totals["sequence_tokens"]
        metrics["learner/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["time/update"] = elapsed
        return metrics

    def _mini_batch_step(
        self,
        samples: list[Trajectory],
        advantages: list[torch.Tensor],
        micro_totals: dict[str, float],
        step_totals: dict[str, float],
    ) -> None:
        num_tokens, num_seqs = _global_counts(samples)
        keep = [i for i, s in enumerate(samples) if not self._skippable(s, advantages[i])]
        step_totals["learner/skipped_samples"] += len(samples) - len(keep)
        step_totals["sequence_tokens"] += sum(len(samples[i].prompt_ids) + len(samples[i].response_ids) for i in keep)
        learner = self.cfg.learner
        plan = plan_by_prompt(samples, keep, learner.micro_batch_tokens, learner.share_prefix)
        # Every rank must run the same number of backward passes (ZeRO hangs otherwise).
        n_micro = _max_over_ranks(len(plan))
        grad_norm = 0.0
        if n_micro == 0:
            return  # every advantage was zero on every rank: no gradient, no optimizer step
        for k in range(n_micro):
            self.engine.set_gradient_accumulation_boundary(k == n_micro - 1)
            if k < len(plan):
                micro = make_micro_batch(samples, advantages, plan[k], learner.packing, learner.share_prefix)
                loss, metrics = self._loss(micro, num_tokens, num_seqs)
            else:  # this rank has fewer micro-batches: a zero-loss pass keeps the collectives aligned
                loss, metrics = self._dummy_loss(), {}
            self.engine.backward(loss)
            if k == n_micro - 1 and learner.zero_stage == 0:  # DeepSpeed records no norm there (fp32)
                grad_norm = _grad_norm(self.engine.module)
            self.engine.step()
            for key, value in metrics.items():
                micro_totals[key] += value
            micro_totals["_micro_batches"] += 1
        step_totals["learner/grad_norm"] += float(self.engine.get_global_grad_norm() or grad_norm)
        step_totals["learner/optimizer_steps"] += 1

    def _loss(self, micro: MicroBatch, num_tokens: int, num_seqs: int) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs_flat, entropy_flat = self._token_logprobs(micro, with_entropy=True)
        logprobs = micro.scatter(logprobs_flat)
        inputs = LossInputs(
            logprobs=logprobs,
            # On-policy single pass: pi_old is the current policy, so the ratio is exactly 1 and
            # no second forward is needed. Several epochs/mini-batches need recorded old logprobs.
            old_logprobs=self._old_logprobs(micro, logprobs),
            advantages=micro.advantages,
            loss_mask=micro.loss_mask,
            rollout_logprobs=micro.rollout_logprobs,
            entropy=micro.scatter(entropy_flat.detach()),
        )
        out = self.loss_fn(inputs)
        loss = aggregate(
            out.per_token_loss,
            micro.loss_mask,
            self.cfg.algo.aggregation.mode,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            loss_scale_factor=self.cfg.algo.aggregation.loss_scale_factor,
        )
        # DeepSpeed averages gradients over ranks; the global counts already normalise.
        loss = loss * self.world_size
        metrics = {key: float(value) for key, value in out.metrics.items()}
        metrics["loss/policy"] = float(loss.detach()) / self.world_size
        metrics["entropy/learner_mean"] = float(masked_mean(inputs.entropy, micro.loss_mask))
        mismatch = (logprobs.detach() - micro.rollout_logprobs).abs()
        metrics["learner/rollout_logprob_diff"] = float(masked_mean(mismatch, micro.loss_mask))
        metrics["_tokens"] = float(micro.num_tokens)
        return loss, metrics

    def _old_logprobs(self, micro: MicroBatch, logprobs: torch.Tensor) -> torch.Tensor:
        if self.cfg.learner.epochs == 1 and self.cfg.learner.mini_batches == 1:
            return logprobs.detach()
        return micro.rollout_logprobs  # off-policy passes: the behaviour policy's own logprobs

    def _token_logprobs(self, micro: MicroBatch, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        model = self.engine.module
        hidden = model.model(
            input_ids=micro.input_ids,
            position_ids=micro.position_ids,
            attention_mask=micro.attention_mask,
            use_cache=False,
        ).last_hidden_state
        targets = hidden.reshape(-1, hidden.shape[-1])[micro.target_positions]
        return logprobs_and_entropy_from_hidden(
            targets,
            model.lm_head.weight,
            micro.target_ids,
            temperature=self.cfg.learner.temperature,
            with_entropy=with_entropy,
        )

    def _dummy_loss(self) -> torch.Tensor:
        """Zero loss through the same forward as a real micro-batch (one token): ZeRO-2 reduces
        gradients in the order they become ready, so another graph would mix up parameters."""
        sample = Trajectory([0], [0], [1], [0.0], [0.0], 0.0, 0, 0)
        logprobs, _ = self._token_logprobs(make_micro_batch([sample], [torch.zeros(1)], [0]), with_entropy=False)
        return logprobs.sum() * 0.0

    def _skippable(self, sample: Trajectory, advantage: torch.Tensor) -> bool:
        if not self.cfg.algo.skip_zero_advantage or self.cfg.algo.loss.name not in _ZERO_AT_ZERO_ADVANTAGE:
            return False
        mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
        return bool((advantage[: len(mask)][mask] == 0).all())

    # -- weights ----------------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current policy weights for the inference engine (ZeRO-3: gathered one at a time)."""
        import deepspeed

        for name, param in self.engine.module.named_parameters():
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param]):
                    yield name, param.data.detach().clone()
            else:
                yield name, param.data.detach()

    def save_pretrained(self, path: str, tokenizer=None) -> None:
        if dist.get_rank() == 0:
            self.engine.module.save_pretrained(path, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)


def _split(n: int, parts: int) -> list[list[int]]:
    size = -(-n // parts)
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)] or [[]]


def _global_counts(samples: list[Trajectory]) -> tuple[int, int]:
    counts = torch.tensor(
        [sum(s.num_sampled_tokens for s in samples), sum(s.num_sampled_tokens > 0 for s in samples)],
        dtype=torch.float64,
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the (already all-reduced) gradients, before clipping."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _max_over_ranks(value: int) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)
