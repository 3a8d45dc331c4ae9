"""The learner: one DeepSpeed engine that turns packed micro-batches into optimizer steps.

The only module that imports deepspeed. It knows the model and the optimizer; the math comes from
the registries (`trainer/losses.py`, `trainer/regularizers.py`, `trainer/aggregation.py`,
`trainer/logprobs.py`).

One update = every micro-batch of every mini-batch: forward (packed, no padding), logprobs of
sampled tokens only, the registered policy loss and regularisers, each aggregated with GLOBAL
token/sequence counts (so the gradient does not depend on how samples were split into
micro-batches or ranks), summed, backward, and one optimizer step per mini-batch.

What is computed follows the union of the configured terms' `needs` (algorithms.md §8.1, never
a coefficient): exact entropy ("entropy"; differentiable, since regularisers use its gradient;
policy losses and token weights get it detached), AEnt's clamped entropy, SIREN's top-p
entropy, and the log-probs of a frozen reference model ("ref_logprobs": a second copy of the
initial weights, eval mode, no grad, built only then). The 80/20 forking-token mask
(`algo.forking_tokens`) is the loss mask of the policy term only; regularisers keep the full
mask. Cross-step state lives in controllers (`self.controllers`): the learner reduces the step's
metrics over micro-batches and ranks into `self.controller_stats`, and the loop calls
`ctrl.update(stats)` after each step; `state_dict_extra()` is their checkpointable state.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from agents.types import Trajectory
from trainer.aggregation import aggregate
from trainer.batch import MicroBatch, make_micro_batch, plan_by_prompt
from trainer.config import Config, optimizer_steps
from trainer.controllers import Controller, make_controller
from trainer.device import all_gather_1d, backend_for, max_over_ranks, resolve_device, sum_over_ranks
from trainer.logprobs import Head, TokenStats, head_requires_grad, project, token_stats_from_hidden
from trainer.losses import (
    POLICY_LOSSES,
    TOKEN_WEIGHTS,
    BatchStats,
    LossInputs,
    TokenBatch,
    batch_stats_fn,
    forking_token_mask,
    masked_mean,
    token_batch,
    with_token_weights,
)
from trainer.off_policy import mismatch_metrics, rollout_is_weights
from trainer.regularizers import REGULARIZERS, top_p_entropy_from_logits
from trainer.schedules import lr_multiplier

# Losses whose per-token loss (and gradient) is exactly 0 where the advantage is 0, so samples
# with all-zero advantages can be skipped without changing the update (when nothing else is
# in the update: see `DeepSpeedLearner._skip_allowed`).
_ZERO_AT_ZERO_ADVANTAGE = {"ppo_clip", "gspo"}
# Optional LossInputs the learner can produce.
_SUPPORTED_NEEDS = {
    "entropy",
    "clamped_entropy",
    "top_p_entropy",
    "ref_logprobs",
    "rollout_logprobs",
    "traj_ids",
    "turn_idx",
    "reinforce_mask",
}
_DETACHED_FOR_POLICY = ("entropy", "clamped_entropy", "top_p_entropy")
_SUMMED_STATS = ("bapo/",)  # controller stats that are sums (BAPO grid sums), not token means
_MAX_STATS = ("off_policy/log_ratio_abs_max",)  # maxima over micro-batches and ranks
_MIN_MICRO_BATCH_TOKENS = 64  # below this an OOM is not a micro-batch size problem


@dataclass
class _Term:
    """One regulariser: metric key (loss/<key>), built fn, aggregation mode, optional controller."""

    key: str
    fn: Any
    mode: str
    controller: Controller | None


@dataclass
class _MiniBatch:
    """The samples of one optimizer step, their advantage rows and (off-policy) recorded pi_old."""

    samples: list[Trajectory]
    advantages: list[torch.Tensor]
    old_logprobs: list[torch.Tensor] | None = None


@dataclass
class _BatchView:
    """What the whole mini-batch decides for its micro-batches (see `_batch_view`)."""

    selections: list[torch.Tensor] | None  # per-micro-batch forking masks (global scope)
    policy_tokens: int  # global count of the policy term's tokens
    loss_stats: BatchStats | None = None  # the policy loss's global batch statistics
    weight_stats: BatchStats | None = None  # the token-weight hook's


@dataclass
class _Counts:
    """Global counts of one mini-batch (all micro-batches, all ranks) for the aggregations.

    With the forking-token mask the policy term's token-mean divides by `policy_tokens` (the
    selected count, as the reference); the seq-mean modes keep `seqs`, so a sequence none of
    whose tokens was selected still counts (with loss 0) in the policy term's denominator.
    """

    tokens: int  # sampled tokens (loss_mask == 1)
    seqs: int  # sequences with at least one sampled token
    policy_tokens: int  # tokens in the policy term's mask (= tokens without the forking mask)


def init_distributed(device: torch.device | None = None) -> None:
    """Join the process group the `deepspeed` launcher describes, or make a 1-rank one: NCCL
    when this rank computes on a GPU (`device`, made current first), gloo otherwise."""
    import deepspeed

    if dist.is_initialized():
        return
    # DeepSpeed JIT-builds a CPU comm op with the first `ninja` on PATH; prefer this venv's so a
    # system ninja does not rebuild (and invalidate) the shared extension cache on every switch.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] == "1":
        # Only this process joins a 1-rank group, so any free port serves; an inherited
        # MASTER_PORT (a parent process's own group) would be taken.
        os.environ["MASTER_PORT"] = str(_free_port())
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and DeepSpeed's engine use the current device
    backend = backend_for(device)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if backend == "gloo":
        _unlink_shm_buffer()


def shm_buffer_path(rank: int, addr: str, port: str) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for `rank` (ops/csrc/cpu/comm/shm.cpp)."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce creates one 66 MB /dev/shm file per rank and never unlinks it,
    so every multi-rank CPU run, ended or killed, leaves them in RAM. init returns only once this
    rank has mapped every peer's file; after a barrier all have, and each rank removes its own
    name (the mappings live on): a run then leaves nothing behind, even when killed."""
    dist.barrier()
    shm_buffer_path(dist.get_rank(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]).unlink(
        missing_ok=True
    )


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
    if cfg.train.device.startswith("cuda") and cfg.model.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}  # bf16 compute, fp32 master weights in the optimizer
    return config


class DeepSpeedLearner:
    def __init__(self, cfg: Config, model_path: str):
        import deepspeed
        from transformers import AutoModelForCausalLM

        if cfg.learner.threads:
            torch.set_num_threads(cfg.learner.threads)
        self.device = resolve_device(cfg.train.device)  # every micro-batch goes here
        init_distributed(self.device)
        self.cfg = cfg
        self._build_terms(cfg)  # before the model: a bad term fails fast
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
        self._stat_sums: dict[str, float] = defaultdict(float)
        self._stat_weights: dict[str, float] = defaultdict(float)
        self._stat_max: dict[str, float] = {}  # _MAX_STATS: maxima, not token means

    # -- what the update computes -----------------------------------------------------------------

    def _build_terms(self, cfg: Config) -> None:
        algo, steps = cfg.algo, cfg.train.steps
        self.loss_fn = POLICY_LOSSES.build(algo.loss.name, algo.loss.params)
        mode = algo.aggregation.mode
        if mode == "auto":  # a Config that did not go through `finalize`
            mode = self.loss_fn.flags.get("aggregation", "token-mean")
        self.policy_mode = mode
        self.loss_controller = make_controller(
            algo.loss.name, self.loss_fn.params, total_steps=steps, kind="policy_loss"
        )
        names = [reg.name for reg in algo.regularizers]
        self.regularizers: list[_Term] = []
        for i, reg in enumerate(algo.regularizers):
            fn = REGULARIZERS.build(reg.name, reg.params)
            key = reg.name if names.count(reg.name) == 1 else f"{reg.name}_{i}"
            controller = make_controller(reg.name, fn.params, total_steps=steps)
            self.regularizers.append(_Term(key, fn, fn.flags.get("aggregation", mode), controller))
        name = algo.token_weights.name
        self.token_weights = TOKEN_WEIGHTS.build(name, algo.token_weights.params) if name else None
        self.loss_stats_fn = batch_stats_fn(self.loss_fn)
        self.weight_stats_fn = batch_stats_fn(self.token_weights) if self.token_weights is not None else None
        needs = set(self.loss_fn.needs)
        for term in self.regularizers:
            needs |= term.fn.needs
        if self.token_weights is not None:
            needs |= self.token_weights.needs
        if algo.forking_tokens > 0:
            needs.add("entropy")
        unsupported = needs - _SUPPORTED_NEEDS
        if unsupported:
            raise ValueError(
                f"the configured loss terms need {sorted(unsupported)}, which the learner cannot "
                f"provide yet (it provides {sorted(_SUPPORTED_NEEDS)})"
            )
        self.needs = frozenset(needs)
        if "turn_idx" in needs and cfg.rollout.mode != "step":
            raise ValueError(
                "a configured term reads per-turn samples (turn_idx, e.g. epo with history: turn): "
                "set rollout.mode=step (one sample per turn)"
            )
        drop = {term.fn.params.drop_frac for term in self.regularizers if "clamped_entropy" in term.fn.needs}
        if len(drop) > 1:
            raise ValueError(
                f"regularisers ask for clamped entropies with different drop_frac {sorted(drop)}"
            )
        self.clamp_drop_frac = drop.pop() if drop else None

    @property
    def controllers(self) -> dict[str, Controller]:
        """Every controller of the configured terms by name ("policy" or the regulariser's key)."""
        found = {"policy": self.loss_controller} if self.loss_controller is not None else {}
        found.update({t.key: t.controller for t in self.regularizers if t.controller is not None})
        return found

    def state_dict_extra(self) -> dict[str, Any]:
        """What a checkpoint needs beyond model and optimizer: the controllers' state."""
        return {"controllers": {name: c.state_dict() for name, c in self.controllers.items()}}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        for name, controller in self.controllers.items():
            controller.load_state_dict(state["controllers"][name])

    def _skip_allowed(self) -> bool:
        """Skipping all-zero-advantage samples is exact only when the policy loss is 0 at A = 0
        and nothing else (a regulariser, batch statistics of a token hook) sees those tokens."""
        algo = self.cfg.algo
        return (
            algo.skip_zero_advantage
            and algo.loss.name in _ZERO_AT_ZERO_ADVANTAGE
            and not self.regularizers
            and self.token_weights is None
            and algo.forking_tokens == 0
        )

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
        self._stat_sums.clear()
        self._stat_weights.clear()
        self._stat_max.clear()
        old = self._recorded_old_logprobs(samples) if self._recompute_old() else None
        for _ in range(self.cfg.learner.epochs):
            for index in _split(len(samples), self.cfg.learner.mini_batches):
                batch = _MiniBatch(
                    [samples[i] for i in index],
                    [advantages[i] for i in index],
                    None if old is None else [old[i] for i in index],
                )
                self._mini_batch_step_or_retry(batch, micro_totals, step_totals)
        self.controller_stats = self._reduce_stats(len(samples))
        if step_totals["learner/nonfinite_steps"]:
            self.controller_stats = {}  # NaN statistics must not reach EPO/AEnt/KL history
        elapsed = time.perf_counter() - started
        n_steps = max(step_totals["learner/optimizer_steps"], 1.0)
        # per-token metrics: token-weighted over every micro-batch and rank (see `_add_stats`)
        metrics = {k: v for k, v in self.controller_stats.items() if k != "batch/num_samples"}
        # loss terms: exact mini-batch values (summed over micro-batches and ranks), step mean
        metrics.update({k: v / n_steps for k, v in step_totals.items() if k.startswith("loss/")})
        metrics["learner/grad_norm"] = step_totals["learner/grad_norm"] / n_steps
        metrics["learner/optimizer_steps"] = step_totals["learner/optimizer_steps"]
        metrics["learner/skipped_samples"] = step_totals["learner/skipped_samples"]
        metrics["learner/nonfinite_steps"] = step_totals["learner/nonfinite_steps"]
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
            stats = (dict(self._stat_sums), dict(self._stat_weights), dict(self._stat_max))
            micro, step = defaultdict(float), defaultdict(float)
            try:
                self._mini_batch_step(batch, micro, step)
                break
            except torch.OutOfMemoryError:
                rolled_back = self.cfg.learner.zero_stage == 0 or not self._backward_ran
                if self.world_size > 1 or not rolled_back or not self._can_split_further(batch.samples):
                    raise
                self._stat_sums, self._stat_weights = (defaultdict(float, d) for d in stats[:2])
                self._stat_max = dict(stats[2])
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
        num_tokens, num_seqs = _global_counts(samples)
        skip = self._skip_allowed()
        keep = [i for i, s in enumerate(samples) if not (skip and _all_zero(s, advantages[i]))]
        step_totals["learner/skipped_samples"] += len(samples) - len(keep)
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        step_totals["sequence_tokens"] += sum(lengths[i] for i in keep)
        step_totals["batch_tokens"] += sum(lengths)
        learner = self.cfg.learner
        plan = plan_by_prompt(samples, keep, self.micro_batch_tokens, learner.share_prefix)
        # Every rank must run the same number of backward passes (ZeRO hangs otherwise).
        n_micro = max_over_ranks(len(plan))
        grad_norm = 0.0
        if n_micro == 0:
            return  # every advantage was zero on every rank: no gradient, no optimizer step
        micros = [
            make_micro_batch(samples, advantages, idx, learner.packing, learner.share_prefix).to(self.device)
            for idx in plan
        ]
        if old_logprobs is not None:
            for micro in micros:
                micro.old_logprobs = _rows(old_logprobs, micro)
        view = self._batch_view(micros, n_micro, num_tokens)
        selections, policy_tokens = view.selections, view.policy_tokens
        counts = _Counts(num_tokens, num_seqs, policy_tokens)
        if self.cfg.algo.forking_tokens > 0:
            step_totals["loss/selected_frac"] += policy_tokens / max(num_tokens, 1)
        term_keys = ["loss/total", "loss/policy"] + [f"loss/{t.key}" for t in self.regularizers]
        term_sums = torch.zeros(len(term_keys), dtype=torch.float64)
        self._backward_ran = False
        for k in range(n_micro):
            self.engine.set_gradient_accumulation_boundary(k == n_micro - 1)
            if k < len(micros):
                micro = micros[k]
                traj_ids = torch.tensor([samples[i].traj_id for i in micro.sample_index], device=self.device)
                micro.turn_idx = _turn_idx(samples, micro) if "turn_idx" in self.needs else None
                micro.reinforce_mask = (
                    _reinforce_mask(samples, micro) if "reinforce_mask" in self.needs else None
                )
                selection = selections[k] if selections is not None else None
                loss, terms, metrics, weights = self._loss(micro, counts, traj_ids, selection, view)
                term_sums += torch.tensor([terms[key] for key in term_keys], dtype=torch.float64)
                self._add_stats(metrics, weights)
                micro_totals["_tokens"] += float(micro.num_tokens)
            else:  # this rank has fewer micro-batches: a zero-loss pass keeps the collectives aligned
                loss = self._dummy_loss()
            self._backward_ran = True  # set before: an OOM inside backward leaves partial gradients
            self.engine.backward(loss)
            if k == n_micro - 1 and learner.zero_stage == 0:  # DeepSpeed records no norm there (fp32)
                grad_norm = _grad_norm(self.engine.module)
                if not math.isfinite(grad_norm):  # stage 0 would apply it: drop it instead
                    self.engine.module.zero_grad(set_to_none=True)
                    continue
            self.engine.step()  # ZeRO 1/2 skip the step themselves on a non-finite gradient norm
        term_sums = sum_over_ranks(term_sums)
        for key, value in zip(term_keys, term_sums.tolist(), strict=True):
            step_totals[key] += value
        norm = float(self.engine.get_global_grad_norm() or grad_norm)
        if not math.isfinite(norm):  # a NaN/inf loss or gradient: the weights were not touched
            step_totals["learner/nonfinite_steps"] += 1
            return
        step_totals["learner/grad_norm"] += norm
        step_totals["learner/optimizer_steps"] += 1

    def _loss(
        self,
        micro: MicroBatch,
        counts: _Counts,
        traj_ids: torch.Tensor,
        selection: torch.Tensor | None,
        view: _BatchView,
    ) -> tuple[torch.Tensor, dict[str, float], dict[str, float], dict[str, float]]:
        """(scaled loss to backward, {"loss/<term>": this micro-batch's share}, metrics, and the
        token count each metric is a mean over: the policy term's mask for its own metrics,
        the full loss mask for the rest)."""
        stats, top_p = self._token_stats(self.engine.module, micro)
        logprobs = micro.scatter(stats.logprobs)
        optional = lambda v: None if v is None else micro.scatter(v)  # noqa: E731
        ref_logprobs = self._ref_logprobs(micro) if self.ref_model is not None else None
        inputs = LossInputs(
            logprobs=logprobs,
            # On-policy single pass: pi_old is the current policy, so the ratio is exactly 1 and
            # no second forward is needed. Several epochs/mini-batches need recorded old logprobs.
            old_logprobs=self._old_logprobs(micro, logprobs),
            advantages=micro.advantages,
            loss_mask=micro.loss_mask,
            rollout_logprobs=micro.rollout_logprobs,
            ref_logprobs=ref_logprobs,
            entropy=optional(stats.entropy),
            clamped_entropy=optional(stats.clamped_entropy),
            top_p_entropy=optional(top_p),
            traj_ids=traj_ids,
            turn_idx=micro.turn_idx,
            reinforce_mask=micro.reinforce_mask,
        )
        metrics: dict[str, float] = {}
        # The policy term: detached entropies, the forking-token mask, token weights.
        policy_mask = micro.loss_mask
        if self.cfg.algo.forking_tokens > 0:
            if selection is None:  # stats_scope "micro_batch": the top ratio of this micro-batch
                selection = forking_token_mask(inputs.entropy, micro.loss_mask, self.cfg.algo.forking_tokens)
            policy_mask = selection
        if micro.reinforce_mask is not None:  # Arbitrary-Entropy PO's extras: their own term only
            policy_mask = policy_mask * (1 - micro.reinforce_mask)
        detached = {
            f: getattr(inputs, f).detach() for f in _DETACHED_FOR_POLICY if getattr(inputs, f) is not None
        }
        policy_inputs = dataclasses.replace(inputs, loss_mask=policy_mask, **detached)
        mode = self.cfg.algo.rollout_is
        metrics.update(
            {
                k: float(v)
                for k, v in mismatch_metrics(inputs.old_logprobs, micro.rollout_logprobs, policy_mask).items()
            }
        )
        if mode != "none":
            is_weights = rollout_is_weights(
                inputs.old_logprobs, micro.rollout_logprobs, policy_mask, mode, self.cfg.algo.rollout_is_cap
            )
            policy_inputs = with_token_weights(policy_inputs, is_weights)
            metrics["off_policy/is_weight_mean"] = float(masked_mean(is_weights, policy_mask))
        if self.token_weights is not None:
            extra = {} if view.weight_stats is None else {"batch_stats": view.weight_stats}
            weighting = self.token_weights(policy_inputs, **extra)
            policy_inputs = with_token_weights(policy_inputs, weighting.token_weights)
            metrics.update({k: float(v) for k, v in weighting.metrics.items()})
        kwargs = self.loss_controller.loss_kwargs() if self.loss_controller is not None else {}
        if view.loss_stats is not None:  # stats_scope "global": the whole mini-batch's statistics
            kwargs["batch_stats"] = view.loss_stats
        out = self.loss_fn(policy_inputs, **kwargs)
        metrics.update({k: float(v) for k, v in out.metrics.items()})
        weights = dict.fromkeys(metrics, float((policy_mask > 0).sum()))
        lsf = self.cfg.algo.aggregation.loss_scale_factor
        terms = {
            "loss/policy": aggregate(
                out.per_token_loss,
                policy_mask,
                self.policy_mode,
                num_tokens=counts.policy_tokens,
                num_seqs=counts.seqs,
                loss_scale_factor=lsf,
            )
        }
        for term in self.regularizers:
            kwargs = term.controller.loss_kwargs() if term.controller is not None else {}
            reg = term.fn(inputs, **kwargs)
            metrics.update({k: float(v) for k, v in reg.metrics.items()})
            terms[f"loss/{term.key}"] = aggregate(
                reg.per_token_loss,
                micro.loss_mask,
                term.mode,
                num_tokens=counts.tokens,
                num_seqs=counts.seqs,
                loss_scale_factor=lsf,
            )
        loss = sum(terms.values())
        values = {key: float(value.detach()) for key, value in terms.items()}
        values["loss/total"] = float(loss.detach())
        if inputs.entropy is not None:
            metrics["entropy/learner_mean"] = float(masked_mean(inputs.entropy.detach(), micro.loss_mask))
        mismatch = (logprobs.detach() - micro.rollout_logprobs).abs()
        metrics["learner/rollout_logprob_diff"] = float(masked_mean(mismatch, micro.loss_mask))
        valid = float((micro.loss_mask > 0).sum())
        weights.update({k: valid for k in metrics if k not in weights})
        # DeepSpeed averages gradients over ranks; the global counts already normalise.
        return loss * self.world_size, values, metrics, weights

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
        if self._single_pass():  # pi_old is the current policy: no second forward needed
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
        """Per-target log-probs and whatever entropies the configured terms need ([N] each)."""
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
            clamp_drop_frac=None if logprobs_only or entropy_only else self.clamp_drop_frac,
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

    def _batch_view(self, micros: list[MicroBatch], n_micro: int, num_tokens: int) -> _BatchView:
        """What the mini-batch's statistics decide before its micro-batches run.

        stats_scope "micro_batch": nothing is decided here (the forking mask and every loss
        statistic are taken in `_loss` from each micro-batch's own tokens, as the references);
        only the forking term's global token count is known from the plan (top k = ceil(ratio
        * n) of each micro-batch's n sampled tokens). "global": one no-grad pass over the
        mini-batch gives every token's log-prob (and entropy when needed), all-gathered over
        ranks: the forking threshold is the k-th largest entropy of all (k = ceil(ratio * N),
        a token is selected when its entropy is >= it), and the policy loss / token-weight hook
        get their batch statistics (`batch_stats_fn`, over the policy term's tokens).
        """
        ratio = self.cfg.algo.forking_tokens
        if self.cfg.algo.stats_scope == "micro_batch":
            if ratio <= 0:
                return _BatchView(None, num_tokens)
            local = 0
            for micro in micros:
                n = int((micro.loss_mask > 0).sum())
                local += max(1, math.ceil(ratio * n)) if n else 0
            return _BatchView(
                None, int(sum_over_ranks(torch.tensor([float(local)], dtype=torch.float64))[0])
            )
        stat_fns = {
            k: fn for k, fn in (("loss", self.loss_stats_fn), ("weights", self.weight_stats_fn)) if fn
        }
        if ratio <= 0 and not stat_fns:
            return _BatchView(None, num_tokens)
        need_entropy = ratio > 0 or any("entropy" in fn.needs for fn in stat_fns.values())
        passes = self._no_grad_pass(micros, n_micro, need_entropy)
        masks, count = None, num_tokens
        if ratio > 0:
            masks, count = self._global_forking(micros, [entropy for _, entropy in passes], ratio)
        if not stat_fns:
            return _BatchView(masks, count)
        parts = []
        for i, (micro, (logprobs, entropy)) in enumerate(zip(micros, passes, strict=True)):
            inputs = LossInputs(
                logprobs=logprobs,
                old_logprobs=self._old_logprobs(micro, logprobs),
                advantages=micro.advantages,
                loss_mask=micro.loss_mask if masks is None else masks[i],
                entropy=entropy,
            )
            parts.append(token_batch(inputs))
        tokens = _gather_tokens(parts, need_entropy)
        found = {name: fn(tokens) for name, fn in stat_fns.items()}
        return _BatchView(masks, count, found.get("loss"), found.get("weights"))

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

    def _global_forking(
        self, micros: list[MicroBatch], entropies: list[torch.Tensor], ratio: float
    ) -> tuple[list[torch.Tensor], int]:
        """Per-micro-batch forking masks from one threshold over every rank's tokens, and the
        global count of selected tokens."""
        valid = [e[m.loss_mask > 0] for e, m in zip(entropies, micros, strict=True)]
        local = torch.cat(valid) if valid else torch.zeros(0)
        everything = all_gather_1d(local.double())
        if everything.numel() == 0:
            return [torch.zeros_like(m.loss_mask) for m in micros], 0
        k = max(1, math.ceil(ratio * everything.numel()))
        threshold = torch.topk(everything, k).values[-1].to(self.device)
        masks = [
            forking_token_mask(e.double(), m.loss_mask, threshold=threshold)
            for e, m in zip(entropies, micros, strict=True)
        ]
        count = sum(float(m.sum()) for m in masks)
        return masks, int(sum_over_ranks(torch.tensor([count], dtype=torch.float64))[0])

    def _dummy_micro(self) -> MicroBatch:
        sample = Trajectory([0], [0], [1], [0.0], [0.0], 0.0, 0, 0)
        return make_micro_batch([sample], [torch.zeros(1)], [0]).to(self.device)

    def _dummy_forward(self) -> torch.Tensor:
        stats, _ = self._token_stats(self.engine.module, self._dummy_micro(), logprobs_only=True)
        return stats.logprobs

    def _dummy_loss(self) -> torch.Tensor:
        """Zero loss through the same forward as a real micro-batch (one token): ZeRO-2 reduces
        gradients in the order they become ready, so another graph would mix up parameters."""
        return self._dummy_forward().sum() * 0.0

    # -- controller statistics --------------------------------------------------------------------

    def _add_stats(self, metrics: dict[str, float], weights: dict[str, float]) -> None:
        """Accumulate one micro-batch's metrics: means weighted by their token counts, or sums
        (BAPO grid sums). Reduced over ranks by `_reduce_stats`."""
        for key, value in metrics.items():
            if key in _MAX_STATS:
                self._stat_max[key] = max(self._stat_max.get(key, 0.0), value)
                continue
            summed = key.startswith(_SUMMED_STATS)
            self._stat_sums[key] += value if summed else value * weights[key]
            self._stat_weights[key] += 1.0 if summed else weights[key]

    def _reduce_stats(self, num_samples: int) -> dict[str, float]:
        """The step's metrics over all micro-batches and ranks, identical on every rank."""
        keys, maxima = sorted(self._stat_sums), dict(self._stat_max)
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[tuple] = [() for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, (keys, maxima))
            keys = sorted({k for part, _ in gathered for k in part})
            maxima = {}
            for _, part in gathered:
                for k, v in part.items():
                    maxima[k] = max(maxima.get(k, v), v)
        values = torch.tensor(
            [self._stat_sums.get(k, 0.0) for k in keys]
            + [self._stat_weights.get(k, 0.0) for k in keys]
            + [float(num_samples)],
            dtype=torch.float64,
        )
        values = sum_over_ranks(values)
        if not keys:  # no micro-batch ran anywhere: nothing to update controllers with
            return {}
        n = len(keys)
        stats = {"batch/num_samples": float(values[-1])}
        for i, key in enumerate(keys):
            total, weight = float(values[i]), float(values[n + i])
            stats[key] = total if key.startswith(_SUMMED_STATS) else total / max(weight, 1e-12)
        stats.update(maxima)
        return stats

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


def _rows(per_sample: list[torch.Tensor], micro: MicroBatch) -> torch.Tensor:
    """The micro-batch's samples' rows of a per-sample list, in its [B, T] layout."""
    out = torch.zeros_like(micro.loss_mask)
    for r, i in enumerate(micro.sample_index):
        row = per_sample[i][: out.shape[1]]
        out[r, : len(row)] = row.to(out.device)
    return out


def _reinforce_mask(samples: list[Trajectory], micro: MicroBatch) -> torch.Tensor:
    """[B, T] the loss mask on rows of Arbitrary-Entropy PO's extra samples, 0 elsewhere."""
    flags = torch.tensor([float(samples[i].reinforce) for i in micro.sample_index], device=micro.device)
    return micro.loss_mask * flags[:, None]


def _turn_idx(samples: list[Trajectory], micro: MicroBatch) -> torch.Tensor:
    return torch.tensor([samples[i].turn_idx or 0 for i in micro.sample_index], dtype=torch.long, device=micro.device)


def _all_zero(sample: Trajectory, advantage: torch.Tensor) -> bool:
    mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
    return bool((advantage[: len(mask)][mask] == 0).all())


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]








def _gather_tokens(parts: list[TokenBatch], with_entropy: bool) -> TokenBatch:
    """Every rank's valid tokens as one TokenBatch (float64: the statistics' selections stay exact)."""
    empty = torch.zeros(0)
    local = (
        TokenBatch.cat(parts) if parts else TokenBatch(empty, empty, empty, empty if with_entropy else None)
    )
    fields = [local.logprobs, local.old_logprobs, local.advantages]
    if with_entropy:
        fields.append(local.entropy)
    gathered = [all_gather_1d(f.double()) for f in fields]
    return TokenBatch(*gathered[:3], gathered[3] if with_entropy else None)


def _split(n: int, parts: int) -> list[list[int]]:
    size = -(-n // parts)
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)] or [[]]


def _global_counts(samples: list[Trajectory]) -> tuple[int, int]:
    """(sampled tokens, sequences with any) over every rank's share of a mini-batch."""
    counts = torch.tensor(
        [sum(s.num_sampled_tokens for s in samples), sum(s.num_sampled_tokens > 0 for s in samples)],
        dtype=torch.float64,
    )
    counts = sum_over_ranks(counts)
    return int(counts[0]), int(counts[1])


def _grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the (already all-reduced) gradients, before clipping."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0

