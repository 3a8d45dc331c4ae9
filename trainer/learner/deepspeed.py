"""The learner: one DeepSpeed engine that turns packed micro-batches into optimizer steps.

Only `trainer/learner/` imports deepspeed. The learner knows the model, the optimizer and the
ranks; the objective is `trainer/objective.py` (pure math over [B, T] tensors), the process group
and the gradient accumulation are shared with the critic (`trainer/learner/common.py`).

One update = every micro-batch of every mini-batch: forward (packed, no padding), log-probs of
sampled tokens only and whatever entropies the objective `needs` (exact entropy, differentiable;
AEnt's clamped entropy; SIREN's top-p entropy; the log-probs of a frozen reference model, a
second copy of the initial weights built only then), the objective with GLOBAL token/sequence
counts (so the gradient does not depend on how samples were split into micro-batches or ranks),
backward, and one optimizer step per mini-batch (`accumulate_gradients`). stats_scope=global
first runs a no-grad pass over the mini-batch for the forking-token threshold and the batch
statistics, gathered over ranks. Cross-step state lives in the objective's controllers
(`self.controllers`): the learner reduces the step's metrics over micro-batches and ranks into
`self.controller_stats`, and the loop calls `ctrl.update(stats)` after each step;
`state_dict_extra()` is their checkpointable state.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from agents.types import Trajectory
from trainer.batch import MicroBatch, make_micro_batch, plan_by_prompt
from trainer.config import Config, optimizer_steps
from trainer.device import (
    all_gather_1d,
    all_gather_objects,
    max_over_ranks,
    resolve_device,
    sum_over_ranks,
)
from trainer.learner.common import (
    accumulate_gradients,
    ds_config,
    dummy_micro_batch,
    global_counts,
    init_distributed,
    sample_rows,
    split,
)
from trainer.logprobs import Head, TokenStats, head_requires_grad, project, token_stats_from_hidden
from trainer.losses import LossInputs
from trainer.objective import (
    BatchStatistics,
    Counts,
    MetricTotals,
    MiniBatchView,
    Objective,
    ObjectiveOutput,
    PrePass,
    all_zero_advantage,
)
from trainer.regularizers import top_p_entropy_from_logits
from trainer.schedules import lr_multiplier


@dataclass
class _MiniBatch:
    """The samples of one optimizer step, their advantage rows and (off-policy) recorded pi_old."""

    samples: list[Trajectory]
    advantages: list[torch.Tensor]
    old_logprobs: list[torch.Tensor] | None = None


class DeepSpeedLearner:
    def __init__(self, cfg: Config, model_path: str):
        import deepspeed
        from transformers import AutoModelForCausalLM

        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        self.device = resolve_device(cfg.train.device)  # every micro-batch goes here
        init_distributed(self.device)
        self.cfg = cfg
        self.objective = Objective(cfg)  # before the model: a bad term fails fast
        self.needs, self.loss_fn = self.objective.needs, self.objective.loss_fn
        self.controllers = self.objective.controllers  # by name: "policy" or a regulariser's key
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if cfg.model.lora.rank:
            model = _with_lora(model, cfg.model.lora)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.learner.lr,
            betas=tuple(cfg.learner.betas),
            weight_decay=cfg.learner.weight_decay,
            foreach=True,
        )
        learner, total = cfg.learner, optimizer_steps(cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, total, learner.warmup_steps, learner.lr_scheduler, learner.min_lr_ratio
            ),
        )
        # DeepSpeed steps the scheduler with each optimizer step and checkpoints it.
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg)
        )
        self.world_size = dist.get_world_size()
        placed = next(self.engine.module.parameters()).device
        if placed != self.device:  # DeepSpeed places the model on its accelerator's device
            raise RuntimeError(
                f"DeepSpeed put the model on {placed}, train.device says {self.device}: set "
                f"DS_ACCELERATOR={'cuda' if self.device.type == 'cuda' else 'cpu'} (entrorl's CLI does)"
            )
        wants_ref = "ref_logprobs" in self.needs or cfg.algo.kl_in_reward.coef > 0
        self.ref_model = self._build_reference(model_path) if wants_ref else None
        self.micro_batch_tokens = cfg.learner.micro_batch_tokens  # halved by an OOM retry
        self._backward_ran = False  # within the current mini-batch (OOM retry safety)
        self.controller_stats: dict[str, float] = {}  # the last update's reduced metrics
        self._metrics = MetricTotals()  # this update's, over micro-batches (reduced over ranks)

    def state_dict_extra(self) -> dict[str, Any]:
        """What a checkpoint needs beyond model and optimizer: the controllers' state."""
        return {"controllers": self.objective.state_dict()}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state["controllers"])

    def _build_reference(self, model_path: str) -> torch.nn.Module:
        """A frozen copy of the initial weights for KL terms (each rank holds a full copy)."""
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        ref.config.use_cache = False
        param = next(self.engine.module.parameters())
        ref.to(device=param.device, dtype=param.dtype)  # the policy's compute dtype: KL 0 at step 0
        ref.eval()
        ref.requires_grad_(False)
        return ref

    # -- one update -------------------------------------------------------------------------------

    def update(self, samples: list[Trajectory], advantages: list[torch.Tensor]) -> dict[str, float]:
        """Optimizer steps on this rank's samples; `advantages[i]` is sample i's [T_i] row."""
        self.engine.train()
        started = time.perf_counter()
        micro_totals: dict[str, float] = defaultdict(float)  # summed over micro-batches
        step_totals: dict[str, float] = defaultdict(float)  # summed over optimizer steps
        self._metrics = MetricTotals()
        old = self._recorded_old_logprobs(samples) if self._recompute_old() else None
        recompute_s = time.perf_counter() - started if old is not None else 0.0  # pi_old's no-grad pass
        for _ in range(self.cfg.learner.epochs):
            for index in split(len(samples), self.cfg.learner.mini_batches):
                batch = _MiniBatch(
                    [samples[i] for i in index],
                    [advantages[i] for i in index],
                    None if old is None else [old[i] for i in index],
                )
                self._mini_batch_step_or_retry(batch, micro_totals, step_totals)
        self.controller_stats = self._metrics.reduce(
            len(samples), sum_fn=sum_over_ranks, gather_fn=all_gather_objects
        )
        if step_totals["learner/nonfinite_steps"]:
            self.controller_stats = {}  # NaN statistics must not reach EPO/AEnt/KL history
        elapsed = time.perf_counter() - started
        n_steps = max(step_totals["learner/optimizer_steps"], 1.0)
        # per-token metrics: token-weighted over every micro-batch and rank (`MetricTotals`)
        metrics = {k: v for k, v in self.controller_stats.items() if k != "batch/num_samples"}
        # loss terms: exact mini-batch values (summed over micro-batches and ranks), step mean
        metrics.update({k: v / n_steps for k, v in step_totals.items() if k.startswith("loss/")})
        metrics["learner/grad_norm"] = step_totals["learner/grad_norm"] / n_steps
        for key in ("optimizer_steps", "skipped_samples", "nonfinite_steps"):
            metrics[f"learner/{key}"] = step_totals[f"learner/{key}"]
        # Throughput in sequence tokens (each sample's prompt + response) per second; the model
        # runs fewer tokens than that when prompts are shared (`learner/compute_tokens`).
        metrics["learner/tokens_per_s"] = step_totals["sequence_tokens"] / max(elapsed, 1e-9)
        metrics["learner/compute_tokens"] = micro_totals["_tokens"]
        metrics["learner/sequence_tokens"] = step_totals["sequence_tokens"]
        # every sample's tokens, skipped ones included: what a learner without skipping and
        # without prompt sharing would run through the model
        metrics["learner/batch_tokens"] = step_totals["batch_tokens"]
        metrics["learner/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["learner/oom_retries"] = step_totals["learner/oom_retries"]
        metrics["learner/micro_batch_tokens"] = float(self.micro_batch_tokens)
        metrics["time/update"] = elapsed
        metrics["time/pi_old_recompute"] = recompute_s
        return metrics

    def _mini_batch_step_or_retry(
        self, batch: _MiniBatch, micro_totals: dict[str, float], step_totals: dict[str, float]
    ) -> None:
        """One mini-batch; on out-of-memory (one rank), drop its partial gradients and run it
        again with half the micro-batch token budget, which stays lowered for the rest of the run.
        The mini-batch (so the global batch and the update) is unchanged: only how it is split.

        Raised instead (the loop then stops naming the knobs) with several ranks: the other
        ranks are already inside this micro-batch's gradient collectives, so a retry cannot be
        agreed without a collective per micro-batch; and under ZeRO 1-3 once a backward of the
        mini-batch has run: ZeRO keeps the accumulated gradients in its own partitioned
        buffers, which cannot be rolled back. Micro-batches are planned largest first, so the
        usual OOM (the first forward) is retried under every stage."""
        while True:
            saved = self._metrics.copy()
            micro, step = defaultdict(float), defaultdict(float)
            try:
                self._mini_batch_step(batch, micro, step)
                break
            except torch.OutOfMemoryError:
                rolled_back = self.cfg.learner.zero_stage == 0 or not self._backward_ran
                if self.world_size > 1 or not rolled_back or not self._can_split_further(batch.samples):
                    raise
                self._metrics = saved
                self.engine.zero_grad()  # the failed attempt's partial gradients
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.micro_batch_tokens //= 2
                step_totals["learner/oom_retries"] += 1
                print(
                    f"[entrorl] learner out of memory: retrying the mini-batch with "
                    f"learner.micro_batch_tokens={self.micro_batch_tokens} (set it in the config to skip this)",
                    file=sys.stderr,
                )
        for totals, part in ((micro_totals, micro), (step_totals, step)):
            for key, value in part.items():
                totals[key] += value

    def _can_split_further(self, samples: list[Trajectory]) -> bool:
        """Whether half the token budget gives more micro-batches (a prompt group is never split)."""
        index, share = list(range(len(samples))), self.cfg.learner.share_prefix
        now = plan_by_prompt(samples, index, self.micro_batch_tokens, share)
        return len(plan_by_prompt(samples, index, self.micro_batch_tokens // 2, share)) > len(now)

    def _mini_batch_step(
        self, batch: _MiniBatch, micro_totals: dict[str, float], step_totals: dict[str, float]
    ) -> None:
        samples, advantages, old_logprobs = batch.samples, batch.advantages, batch.old_logprobs
        num_tokens, num_seqs = global_counts(samples)
        skip = self.objective.skips_zero_advantage
        keep = [i for i, s in enumerate(samples) if not (skip and all_zero_advantage(s.loss_mask, advantages[i]))]
        step_totals["learner/skipped_samples"] += len(samples) - len(keep)
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        step_totals["sequence_tokens"] += sum(lengths[i] for i in keep)
        step_totals["batch_tokens"] += sum(lengths)
        learner = self.cfg.learner
        plan = plan_by_prompt(samples, keep, self.micro_batch_tokens, learner.share_prefix)
        n_micro = max_over_ranks(len(plan))  # every rank runs as many backward passes
        if n_micro == 0:
            return  # every advantage was zero on every rank: no gradient, no optimizer step
        micros = [
            make_micro_batch(samples, advantages, idx, learner.packing, learner.share_prefix).to(self.device)
            for idx in plan
        ]
        if old_logprobs is not None:
            for micro in micros:
                micro.old_logprobs = sample_rows(old_logprobs, micro)
        view = self._batch_view(micros, n_micro, num_tokens)
        counts = Counts(num_tokens, num_seqs, view.policy_tokens)
        if self.cfg.algo.forking_tokens > 0:
            step_totals["loss/selected_frac"] += view.policy_tokens / max(num_tokens, 1)
        term_keys = self.objective.term_keys
        term_sums = torch.zeros(len(term_keys), dtype=torch.float64)

        def loss_of(k: int) -> torch.Tensor:
            selection = view.selections[k] if view.selections is not None else None
            out = self._objective(samples, micros[k], counts, selection, view.stats)
            term_sums.add_(torch.tensor([out.terms[key] for key in term_keys], dtype=torch.float64))
            self._metrics.add(out)
            micro_totals["_tokens"] += float(micros[k].num_tokens)
            return out.loss

        self._backward_ran = False
        step = accumulate_gradients(
            self.engine,
            len(micros),
            n_micro,
            loss_of,
            self._dummy_loss,
            world_size=self.world_size,
            zero_stage=learner.zero_stage,
            before_backward=lambda: setattr(self, "_backward_ran", True),
        )
        for key, value in zip(term_keys, sum_over_ranks(term_sums).tolist(), strict=True):
            step_totals[key] += value
        if not math.isfinite(step.norm):  # a NaN/inf loss or gradient: the weights were not touched
            step_totals["learner/nonfinite_steps"] += 1
            return
        step_totals["learner/grad_norm"] += step.norm
        step_totals["learner/optimizer_steps"] += 1

    def _objective(
        self,
        samples: list[Trajectory],
        micro: MicroBatch,
        counts: Counts,
        selection: torch.Tensor | None,
        stats: BatchStatistics | None,
    ) -> ObjectiveOutput:
        """Forward one micro-batch and evaluate the objective on its [B, T] token statistics.
        On-policy single pass: pi_old is the current policy (ratio exactly 1, no second forward);
        several epochs/mini-batches read the pi_old recorded before the first optimizer step."""
        token, top_p = self._token_stats(self.engine.module, micro)
        logprobs = micro.scatter(token.logprobs)
        optional = lambda v: None if v is None else micro.scatter(v)  # noqa: E731
        inputs = LossInputs(
            logprobs=logprobs,
            old_logprobs=self._old_logprobs(micro, logprobs),
            advantages=micro.advantages,
            loss_mask=micro.loss_mask,
            rollout_logprobs=micro.rollout_logprobs,
            ref_logprobs=self._ref_logprobs(micro) if self.ref_model is not None else None,
            entropy=optional(token.entropy),
            clamped_entropy=optional(token.clamped_entropy),
            top_p_entropy=optional(top_p),
            traj_ids=torch.tensor([samples[i].traj_id for i in micro.sample_index], device=self.device),
            turn_idx=_turn_idx(samples, micro) if "turn_idx" in self.needs else None,
            reinforce_mask=_reinforce_mask(samples, micro) if "reinforce_mask" in self.needs else None,
        )
        return self.objective(inputs, counts, selection=selection, stats=stats)

    def _single_pass(self) -> bool:
        return self.cfg.learner.epochs == 1 and self.cfg.learner.mini_batches == 1

    def _recompute_old(self) -> bool:
        """pi_old is recomputed (one no-grad pass before the first optimizer step) whenever a
        rollout feeds more than one optimizer step, as PPO and verl take it: the engine's
        log-probs are the behaviour policy mu, which differs from the learner's weights by the
        training-inference mismatch (kernels, bf16, vLLM) and by any staleness. One pass needs
        no extra forward: pi_old is then the current policy itself."""
        return not self._single_pass()

    def _old_logprobs(self, micro: MicroBatch, logprobs: torch.Tensor) -> torch.Tensor:
        if self._single_pass():  # pi_old is the current policy: the ratio is exactly 1
            return logprobs.detach()
        if micro.old_logprobs is None:
            raise RuntimeError("several optimizer steps per rollout need pi_old recorded before the first")
        return micro.old_logprobs  # recorded before this update's first optimizer step

    def _recorded_old_logprobs(self, samples: list[Trajectory]) -> list[torch.Tensor]:
        """Each sample's [T_i] log-probs under the current weights (pi_old of this update)."""
        return self._sample_logprobs(samples, self.engine.module)

    def reference_logprobs(self, samples: list[Trajectory]) -> list[torch.Tensor]:
        """Each sample's [T_i] log-probs under the frozen reference (KL in the reward)."""
        if self.ref_model is None:
            raise RuntimeError("no reference model: set algo.kl_in_reward.coef > 0 or a kl regulariser")
        return self._sample_logprobs(samples, self.ref_model)

    @torch.no_grad()
    def _sample_logprobs(self, samples: list[Trajectory], model: torch.nn.Module) -> list[torch.Tensor]:
        """Each sample's [T_i] log-probs under `model` (0 where loss_mask == 0), no grad."""
        out = [torch.zeros(len(s.response_ids)) for s in samples]
        learner = self.cfg.learner
        plan = plan_by_prompt(
            samples, list(range(len(samples))), self.micro_batch_tokens, learner.share_prefix
        )
        zeros = [torch.zeros(len(s.response_ids)) for s in samples]
        for k in range(max_over_ranks(len(plan))):  # same forwards on every rank (ZeRO-3)
            if k >= len(plan):
                self._dummy_forward()
                continue
            micro = make_micro_batch(samples, zeros, plan[k], learner.packing, learner.share_prefix)
            stats, _ = self._token_stats(model, micro.to(self.device), logprobs_only=True)
            rows = micro.scatter(stats.logprobs.cpu())
            for r, i in enumerate(micro.sample_index):
                out[i] = rows[r, : len(samples[i].response_ids)]
        return out

    def _token_stats(
        self,
        model: torch.nn.Module,
        micro: MicroBatch,
        *,
        logprobs_only: bool = False,
        entropy_only: bool = False,
    ) -> tuple[TokenStats, torch.Tensor | None]:
        """Per-target log-probs and whatever entropies the objective needs ([N] each)."""
        if model is self.engine.module:
            self._begin_forward()
        model = _causal_lm(model)
        targets = micro.target_hidden(model.model)
        weight = model.lm_head if self.cfg.learner.zero_stage == 3 else model.lm_head.weight  # see `project`
        temperature = self.cfg.learner.temperature
        stats = token_stats_from_hidden(
            targets,
            weight,
            micro.target_ids,
            temperature=temperature,
            with_entropy=entropy_only or (not logprobs_only and "entropy" in self.needs),
            clamp_drop_frac=None if logprobs_only or entropy_only else self.objective.clamp_drop_frac,
        )
        top_p = None
        if not (logprobs_only or entropy_only) and "top_p_entropy" in self.needs:
            top_p = _chunked_top_p_entropy(targets, weight, temperature)
        return stats, top_p

    def _begin_forward(self) -> None:
        """What `engine.forward` does before a pass and our direct call to the decoder skips:
        ZeRO counts micro-steps there, and ZeRO-3 copies (instead of accumulating) the
        gradients of a micro-step it did not count."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self.engine.optimizer, ZeROOptimizer):
            self.engine.optimizer.clear_backward_seen_flag()

    @torch.no_grad()
    def _ref_logprobs(self, micro: MicroBatch) -> torch.Tensor:
        stats, _ = self._token_stats(self.ref_model, micro, logprobs_only=True)
        return micro.scatter(stats.logprobs)

    def _batch_view(self, micros: list[MicroBatch], n_micro: int, num_tokens: int) -> MiniBatchView:
        """What the mini-batch decides before its micro-batches run (`Objective.mini_batch_view`),
        after a no-grad pass over it when stats_scope=global needs one."""
        passes = None
        if self.objective.pre_pass:
            found = self._no_grad_pass(micros, n_micro, self.objective.pre_pass_entropy)
            passes = [
                PrePass(logprobs, self._old_logprobs(micro, logprobs), micro.advantages, entropy)
                for micro, (logprobs, entropy) in zip(micros, found, strict=True)
            ]
        masks = [micro.loss_mask for micro in micros]
        return self.objective.mini_batch_view(
            masks, num_tokens, passes, sum_fn=sum_over_ranks, gather_fn=all_gather_1d
        )

    @torch.no_grad()
    def _no_grad_pass(
        self, micros: list[MicroBatch], n_micro: int, with_entropy: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """([B, T] log-probs, [B, T] entropies or None) of each micro-batch under the current
        weights; the same number of forwards on every rank (ZeRO-3 gathers parameters in them)."""
        out = []
        for k in range(n_micro):
            if k >= len(micros):
                self._dummy_forward()
                continue
            micro = micros[k]
            stats, _ = self._token_stats(
                self.engine.module, micro, logprobs_only=not with_entropy, entropy_only=with_entropy
            )
            entropy = micro.scatter(stats.entropy) if with_entropy else None
            out.append((micro.scatter(stats.logprobs), entropy))
        return out

    def _dummy_forward(self) -> torch.Tensor:
        micro = dummy_micro_batch().to(self.device)
        return self._token_stats(self.engine.module, micro, logprobs_only=True)[0].logprobs

    def _dummy_loss(self) -> torch.Tensor:
        """Zero loss through the same forward as a real micro-batch (one token): ZeRO-2 reduces
        gradients in the order they become ready, so another graph would mix up parameters."""
        return self._dummy_forward().sum() * 0.0

    # -- weights ----------------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current policy weights for the inference engine (ZeRO-3: gathered one at a time)."""
        import deepspeed

        if self.cfg.model.lora.rank:
            yield from _merged_lora_weights(self.engine.module)
            return
        for name, param in self.engine.module.named_parameters():
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param]):
                    yield name, param.data.detach().clone()
            else:
                yield name, param.data.detach()

    def save_pretrained(self, path: str, tokenizer=None) -> None:
        """A plain HF folder. Every rank must call it: under ZeRO-3 the weights are gathered."""
        state = {name: weight.cpu() for name, weight in self.named_weights()}
        if dist.get_rank() == 0:
            _causal_lm(self.engine.module).save_pretrained(path, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)


def _with_lora(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    return get_peft_model(model, config)


def _causal_lm(module: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM inside a module (peft wraps it; its LoRA layers stay in place)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _merged_lora_weights(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Base-model names and weights with the active adapters merged in (W + scale * B A), for
    an inference engine that knows nothing of adapters."""
    from peft.tuners.lora import LoraLayer

    base = _causal_lm(module)
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        weight = param.data.detach()
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner and leaf == "weight":
            layer = layers[owner]
            weight = weight + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(weight.dtype)
        yield name.replace(".base_layer.", "."), weight


def _reinforce_mask(samples: list[Trajectory], micro: MicroBatch) -> torch.Tensor:
    """[B, T] the loss mask on rows of Arbitrary-Entropy PO's extra samples, 0 elsewhere."""
    flags = torch.tensor([float(samples[i].reinforce) for i in micro.sample_index], device=micro.device)
    return micro.loss_mask * flags[:, None]


def _turn_idx(samples: list[Trajectory], micro: MicroBatch) -> torch.Tensor:
    return torch.tensor([samples[i].turn_idx or 0 for i in micro.sample_index], dtype=torch.long, device=micro.device)


def _chunked_top_p_entropy(
    hidden: torch.Tensor, weight: Head, temperature: float, chunk_size: int = 1024
) -> torch.Tensor:
    """SIREN's nucleus entropy [N] from target hidden states [N, H], one chunk of logits at a
    time (checkpointed, so the backward recomputes a chunk's logits too)."""

    def chunk(h: torch.Tensor, w: Head) -> torch.Tensor:
        return top_p_entropy_from_logits(project(h, w), temperature=temperature)

    grad = torch.is_grad_enabled() and (hidden.requires_grad or head_requires_grad(weight))
    pieces = [
        checkpoint(chunk, hidden[s : s + chunk_size], weight, use_reentrant=False)
        if grad
        else chunk(hidden[s : s + chunk_size], weight)
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)

