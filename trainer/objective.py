"""The objective of one micro-batch: token log-probs, entropies and the micro-batch's tensors in,
(loss, per-term values, metrics) out. Pure math: no model, no DeepSpeed, no torch.distributed.

`Objective(cfg)` builds the configured terms from the registries: the policy loss
(`POLICY_LOSSES`, with its controller and its global batch-statistics companion), an optional
token-weight hook (`TOKEN_WEIGHTS`), the regularisers (`REGULARIZERS`, each with its aggregation
mode and controller), the 80/20 forking-token rule (arXiv:2506.01939) and truncated importance
sampling against the engine's log-probs (`trainer/off_policy.py`). What the learner must compute
is the union of the terms' `needs` (`Objective.needs`), never a coefficient.

`objective(inputs, counts, ...)` takes a [B, T] `LossInputs` (the policy's log-probs with
gradient, pi_old, advantages, loss mask, the engine's log-probs mu, and whatever `needs` asks
for) and returns an `ObjectiveOutput`. Each term has its own mask and denominator:

  policy       the forking-token mask (when `algo.forking_tokens` > 0; the micro-batch's own top
               fraction, or `selection` from a threshold over the whole mini-batch), minus the
               rows of Arbitrary-Entropy PO's extra samples; entropies detached; importance and
               token weights applied; aggregated with `counts.policy_tokens` / `counts.seqs`.
  regularisers the full loss mask, differentiable entropies; each aggregated with its own mode
               and `counts.tokens` / `counts.seqs`.

The counts are GLOBAL (every micro-batch of the mini-batch, every rank), and so are the
forking-token threshold and batch statistics of `stats_scope=global` (`mini_batch_view`, given
the collectives as functions). The sum of the micro-batch losses is then the mini-batch
objective however the samples were split (`trainer/aggregation.py`).

What used to be name lists in the learner are registry flags on the entries:

  zero_at_zero_advantage  (policy loss) its per-token loss and gradient are exactly 0 where
                          A = 0, and no other token's loss depends on those tokens (no batch
                          statistics): samples whose every advantage is 0 can be skipped
                          (`skips_zero_advantage`), when no other term sees them either.
  reduce_metrics          {metric key prefix: "sum" | "max"}: metrics of the entry that are not
                          token means (BAPO's grid sums); reduced over micro-batches and ranks by
                          summing or by the maximum (`MetricTotals`).

Metrics are means over the term's mask unless declared otherwise; `ObjectiveOutput.weights`
says how many tokens each mean is over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer.aggregation import aggregate
from trainer.config import Config
from trainer.controllers import Controller, make_controller
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
from trainer.regularizers import REGULARIZERS

# Optional LossInputs the learner can produce.
SUPPORTED_NEEDS = frozenset(
    {
        "entropy",
        "clamped_entropy",
        "top_p_entropy",
        "ref_logprobs",
        "rollout_logprobs",
        "traj_ids",
        "turn_idx",
        "reinforce_mask",
    }
)
_DETACHED_FOR_POLICY = ("entropy", "clamped_entropy", "top_p_entropy")
# `mismatch_metrics` reports the largest |log pi_old - log mu| of its tokens: a maximum.
_MISMATCH_REDUCTIONS = {"off_policy/log_ratio_abs_max": "max"}
REDUCTIONS = ("mean", "sum", "max")


@dataclass(frozen=True)
class Counts:
    """Global counts of one mini-batch (all micro-batches, all ranks): the terms' denominators.

    With the forking-token mask the policy term's token-mean divides by `policy_tokens` (the
    selected count, as the reference); the seq-mean modes keep `seqs`, so a sequence none of
    whose tokens was selected still counts (with loss 0) in the policy term's denominator.
    """

    tokens: int  # sampled tokens (loss_mask == 1): the regularisers' token count
    seqs: int  # sequences with at least one sampled token
    policy_tokens: int  # tokens in the policy term's mask (= tokens without the forking mask)


@dataclass
class BatchStatistics:
    """stats_scope=global: the whole mini-batch's statistics of the loss and the token-weight hook."""

    loss: BatchStats | None = None
    weights: BatchStats | None = None


@dataclass
class PrePass:
    """One micro-batch's [B, T] tensors from the no-grad pass of stats_scope=global."""

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    entropy: Tensor | None = None


@dataclass
class MiniBatchView:
    """What the whole mini-batch decides for its micro-batches (`Objective.mini_batch_view`)."""

    selections: list[Tensor] | None  # per-micro-batch forking masks (stats_scope=global)
    policy_tokens: int  # global count of the policy term's tokens
    stats: BatchStatistics | None = None  # the loss's and the token hook's global statistics


@dataclass
class Regularizer:
    """One regulariser: metric key (loss/<key>), built fn, aggregation mode, optional controller."""

    key: str
    fn: Any
    mode: str
    controller: Controller | None


@dataclass
class ObjectiveOutput:
    """One micro-batch's share of the mini-batch objective.

    loss:       the sum of the terms, to backward (times the world size where data parallelism
                averages gradients: the global counts already normalise).
    terms:      {"loss/total", "loss/policy", "loss/<regulariser key>": value}; summed over
                micro-batches and ranks they are the mini-batch's values.
    metrics:    detached floats by key.
    weights:    the token count each metric is a mean over (the policy mask's for the policy
                term's metrics, the full mask's for the rest).
    reductions: the metrics that are not means: "sum" or "max" (see `MetricTotals`).
    """

    loss: Tensor
    terms: dict[str, float]
    metrics: dict[str, float]
    weights: dict[str, float]
    reductions: dict[str, str] = field(default_factory=dict)


class Objective:
    """The configured terms and how one micro-batch's objective is computed from them."""

    def __init__(self, cfg: Config):
        algo, steps = cfg.algo, cfg.train.steps
        self.forking_tokens = algo.forking_tokens
        self.rollout_is, self.rollout_is_cap = algo.rollout_is, algo.rollout_is_cap
        self.loss_scale_factor = algo.aggregation.loss_scale_factor
        self.skip_zero_advantage = algo.skip_zero_advantage
        self.stats_scope = algo.stats_scope
        self.loss_fn = POLICY_LOSSES.build(algo.loss.name, algo.loss.params)
        mode = algo.aggregation.mode
        if mode == "auto":  # a Config that did not go through `finalize`
            mode = self.loss_fn.flags.get("aggregation", "token-mean")
        self.policy_mode = mode
        self.loss_controller = make_controller(
            algo.loss.name, self.loss_fn.params, total_steps=steps, kind="policy_loss"
        )
        names = [reg.name for reg in algo.regularizers]
        self.regularizers: list[Regularizer] = []
        for i, reg in enumerate(algo.regularizers):
            fn = REGULARIZERS.build(reg.name, reg.params)
            key = reg.name if names.count(reg.name) == 1 else f"{reg.name}_{i}"
            controller = make_controller(reg.name, fn.params, total_steps=steps)
            self.regularizers.append(Regularizer(key, fn, fn.flags.get("aggregation", mode), controller))
        name = algo.token_weights.name
        self.token_weights = TOKEN_WEIGHTS.build(name, algo.token_weights.params) if name else None
        self.loss_stats_fn = batch_stats_fn(self.loss_fn)
        self.weight_stats_fn = batch_stats_fn(self.token_weights) if self.token_weights is not None else None
        built = [self.loss_fn, *(t.fn for t in self.regularizers)]
        built += [self.token_weights] if self.token_weights is not None else []
        self.needs = self._needs(built, algo.forking_tokens > 0, cfg.rollout.mode)
        self.reductions = dict(_MISMATCH_REDUCTIONS)
        for fn in built:
            self.reductions.update(fn.flags.get("reduce_metrics", {}))
        bad = {k: v for k, v in self.reductions.items() if v not in REDUCTIONS}
        if bad:
            raise ValueError(f"reduce_metrics flags {bad}: use one of {REDUCTIONS}")
        drop = {t.fn.params.drop_frac for t in self.regularizers if "clamped_entropy" in t.fn.needs}
        if len(drop) > 1:
            raise ValueError(
                f"regularisers ask for clamped entropies with different drop_frac {sorted(drop)}"
            )
        self.clamp_drop_frac = drop.pop() if drop else None
        self.controllers: dict[str, Controller] = {}
        if self.loss_controller is not None:
            self.controllers["policy"] = self.loss_controller
        self.controllers.update({t.key: t.controller for t in self.regularizers if t.controller is not None})

    @staticmethod
    def _needs(built: list[Any], forking: bool, rollout_mode: str) -> frozenset[str]:
        needs = set().union(*(fn.needs for fn in built))
        if forking:
            needs.add("entropy")
        unsupported = needs - SUPPORTED_NEEDS
        if unsupported:
            raise ValueError(
                f"the configured loss terms need {sorted(unsupported)}, which the learner cannot "
                f"provide yet (it provides {sorted(SUPPORTED_NEEDS)})"
            )
        if "turn_idx" in needs and rollout_mode != "step":
            raise ValueError(
                "a configured term reads per-turn samples (turn_idx, e.g. epo with history: turn): "
                "set rollout.mode=step (one sample per turn)"
            )
        return frozenset(needs)

    @property
    def term_keys(self) -> list[str]:
        return ["loss/total", "loss/policy"] + [f"loss/{t.key}" for t in self.regularizers]

    def state_dict(self) -> dict[str, Any]:
        return {name: c.state_dict() for name, c in self.controllers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, controller in self.controllers.items():
            controller.load_state_dict(state[name])

    # -- what the mini-batch decides ------------------------------------------------------------

    @property
    def skips_zero_advantage(self) -> bool:
        """Skipping all-zero-advantage samples is exact only when the policy loss is 0 at A = 0
        (its `zero_at_zero_advantage` flag) and nothing else (a regulariser, a token hook and its
        batch statistics, the forking-token selection) sees those tokens."""
        return bool(
            self.skip_zero_advantage
            and self.loss_fn.flags.get("zero_at_zero_advantage", False)
            and not self.regularizers
            and self.token_weights is None
            and self.forking_tokens == 0
        )

    @property
    def pre_pass(self) -> bool:
        """Whether `mini_batch_view` needs a no-grad pass over the mini-batch: stats_scope=global
        with a forking-token rule or a batch statistic."""
        return self.stats_scope == "global" and (self.forking_tokens > 0 or bool(self.batch_stats_fns))

    @property
    def pre_pass_entropy(self) -> bool:
        """Whether that pass needs entropies (the forking rule, or a statistic that reads them)."""
        return self.forking_tokens > 0 or any("entropy" in fn.needs for fn in self.batch_stats_fns.values())

    @property
    def batch_stats_fns(self) -> dict[str, Callable[[TokenBatch], BatchStats]]:
        """The global-scope statistics companions of the loss and the token-weight hook."""
        found = {"loss": self.loss_stats_fn, "weights": self.weight_stats_fn}
        return {k: fn for k, fn in found.items() if fn is not None}

    def mini_batch_view(
        self,
        masks: list[Tensor],
        num_tokens: int,
        passes: list[PrePass] | None = None,
        *,
        sum_fn: Callable[[Tensor], Tensor] = lambda values: values,
        gather_fn: Callable[[Tensor], Tensor] = lambda values: values,
    ) -> MiniBatchView:
        """What the whole mini-batch decides before its micro-batches run, from this rank's
        micro-batches' loss `masks`, the global sampled-token count and, when `pre_pass`, each
        micro-batch's no-grad `passes`. The collectives are arguments: `sum_fn` sums a float64
        vector over ranks, `gather_fn` concatenates every rank's 1-D tensor.

        stats_scope "micro_batch": nothing is decided here (the forking mask and every batch
        statistic come from each micro-batch's own tokens, as the references); only the policy
        term's global token count, from the plan (k = max(1, ceil(ratio * n)) of each
        micro-batch's n sampled tokens). "global": the forking threshold is the k-th largest
        entropy of every rank's tokens (k = ceil(ratio * N); a token is selected when its entropy
        is >= it), and the loss / token-weight hook get their statistics over the policy term's
        tokens of the whole mini-batch.
        """
        ratio = self.forking_tokens
        if not self.pre_pass:
            if ratio <= 0:
                return MiniBatchView(None, num_tokens)
            kept = 0
            for mask in masks:
                n = int((mask > 0).sum())
                kept += max(1, math.ceil(ratio * n)) if n else 0
            return MiniBatchView(None, int(sum_fn(torch.tensor([float(kept)], dtype=torch.float64))[0]))
        if passes is None:
            raise ValueError("stats_scope=global needs the mini-batch's no-grad passes")
        selections, count = None, num_tokens
        if ratio > 0:
            entropies = [p.entropy for p in passes]  # the pass computes them for the forking rule
            selections, count = self._global_forking(masks, entropies, sum_fn, gather_fn)  # type: ignore[arg-type]
        if not self.batch_stats_fns:
            return MiniBatchView(selections, count)
        entropy = self.pre_pass_entropy
        parts = [
            token_batch(LossInputs(p.logprobs, p.old_logprobs, p.advantages, mask, entropy=p.entropy))
            for p, mask in zip(passes, masks if selections is None else selections, strict=True)
        ]
        empty = torch.zeros(0)
        mine = TokenBatch.cat(parts) if parts else TokenBatch(empty, empty, empty, empty if entropy else None)
        fields = [mine.logprobs, mine.old_logprobs, mine.advantages] + ([mine.entropy] if entropy else [])
        tokens = TokenBatch(*(gather_fn(f.double()) for f in fields))  # float64: exact selections
        found = {name: fn(tokens) for name, fn in self.batch_stats_fns.items()}
        return MiniBatchView(selections, count, BatchStatistics(found.get("loss"), found.get("weights")))

    def _global_forking(
        self, masks: list[Tensor], entropies: list[Tensor], sum_fn: Callable, gather_fn: Callable
    ) -> tuple[list[Tensor], int]:
        """Per-micro-batch forking masks from one threshold over every rank's tokens, and the
        global count of selected tokens."""
        valid = [e[m > 0] for e, m in zip(entropies, masks, strict=True)]
        everything = gather_fn((torch.cat(valid) if valid else torch.zeros(0)).double())
        if everything.numel() == 0:
            return [torch.zeros_like(m) for m in masks], 0
        k = max(1, math.ceil(self.forking_tokens * everything.numel()))
        threshold = torch.topk(everything, k).values[-1]
        selections = [
            forking_token_mask(e.double(), m, threshold=threshold.to(e.device))
            for e, m in zip(entropies, masks, strict=True)
        ]
        count = sum(float(s.sum()) for s in selections)
        return selections, int(sum_fn(torch.tensor([count], dtype=torch.float64))[0])

    # -- one micro-batch ------------------------------------------------------------------------

    def policy_mask(self, inputs: LossInputs, selection: Tensor | None = None) -> Tensor:
        """The policy term's mask: the forking-token selection (`selection`, from a global
        threshold; else this micro-batch's top fraction), without Arbitrary-Entropy PO's extras."""
        mask = inputs.loss_mask
        if self.forking_tokens > 0:
            if selection is None:
                if inputs.entropy is None:
                    raise ValueError("forking tokens need LossInputs.entropy")
                selection = forking_token_mask(inputs.entropy, inputs.loss_mask, self.forking_tokens)
            mask = selection
        if inputs.reinforce_mask is not None:  # the extras train their own term only
            mask = mask * (1 - inputs.reinforce_mask)
        return mask

    def __call__(
        self,
        inputs: LossInputs,
        counts: Counts,
        *,
        selection: Tensor | None = None,
        stats: BatchStatistics | None = None,
    ) -> ObjectiveOutput:
        """One micro-batch's objective (see the module docstring). `stats`: stats_scope=global's
        batch statistics (None: each statistic over this micro-batch's own tokens)."""
        stats = stats or BatchStatistics()
        mask = self.policy_mask(inputs, selection)
        present = [f for f in _DETACHED_FOR_POLICY if getattr(inputs, f) is not None]
        detached = {f: getattr(inputs, f).detach() for f in present}  # the policy term's entropies
        policy_inputs = dataclasses.replace(inputs, loss_mask=mask, **detached)
        metrics: dict[str, Tensor] = {}
        mu = inputs.rollout_logprobs
        if mu is not None:  # pi_old / mu is always measured
            metrics.update(mismatch_metrics(inputs.old_logprobs, mu, mask))
        if self.rollout_is != "none":
            if mu is None:
                raise ValueError(f"algo.rollout_is={self.rollout_is} needs LossInputs.rollout_logprobs")
            is_weights = rollout_is_weights(inputs.old_logprobs, mu, mask, self.rollout_is, self.rollout_is_cap)
            policy_inputs = with_token_weights(policy_inputs, is_weights)
            metrics["off_policy/is_weight_mean"] = masked_mean(is_weights, mask)
        if self.token_weights is not None:
            extra = {} if stats.weights is None else {"batch_stats": stats.weights}
            weighting = self.token_weights(policy_inputs, **extra)
            policy_inputs = with_token_weights(policy_inputs, weighting.token_weights)
            metrics.update(weighting.metrics)
        kwargs = self.loss_controller.loss_kwargs() if self.loss_controller is not None else {}
        if stats.loss is not None:
            kwargs["batch_stats"] = stats.loss
        out = self.loss_fn(policy_inputs, **kwargs)
        metrics.update(out.metrics)
        values = {k: float(v) for k, v in metrics.items()}
        weights = dict.fromkeys(values, float((mask > 0).sum()))  # the policy term's tokens
        # each term: its per-token loss, its mask, its mode, its global denominators
        policy = self._term(out.per_token_loss, mask, self.policy_mode, counts.policy_tokens, counts)
        terms = {"loss/policy": policy}
        for term in self.regularizers:
            kwargs = term.controller.loss_kwargs() if term.controller is not None else {}
            reg = term.fn(inputs, **kwargs)
            values.update({k: float(v) for k, v in reg.metrics.items()})
            full = inputs.loss_mask
            terms[f"loss/{term.key}"] = self._term(reg.per_token_loss, full, term.mode, counts.tokens, counts)
        loss = sum(terms.values())
        term_values = {key: float(value.detach()) for key, value in terms.items()}
        term_values["loss/total"] = float(loss.detach())
        if inputs.entropy is not None:
            values["entropy/learner_mean"] = float(masked_mean(inputs.entropy.detach(), inputs.loss_mask))
        if mu is not None:
            diff = (inputs.logprobs.detach() - mu).abs()
            values["learner/rollout_logprob_diff"] = float(masked_mean(diff, inputs.loss_mask))
        valid = float((inputs.loss_mask > 0).sum())
        weights.update({k: valid for k in values if k not in weights})
        reductions = {k: r for k in values if (r := self.reduction(k)) != "mean"}
        return ObjectiveOutput(loss, term_values, values, weights, reductions)

    def _term(self, per_token: Tensor, mask: Tensor, mode: str, num_tokens: int, counts: Counts) -> Tensor:
        """One term's scalar: its [B, T] loss under its mask, with the mini-batch's counts."""
        return aggregate(
            per_token,
            mask,
            mode,
            num_tokens=num_tokens,
            num_seqs=counts.seqs,
            loss_scale_factor=self.loss_scale_factor,
        )

    def reduction(self, key: str) -> str:
        """How metric `key` reduces over micro-batches and ranks: "mean" unless declared."""
        return next((r for prefix, r in self.reductions.items() if key.startswith(prefix)), "mean")


def all_zero_advantage(loss_mask: Sequence[int], advantage: Tensor) -> bool:
    """Whether every sampled token of a sample has advantage 0 (a skippable sample)."""
    mask = torch.tensor(loss_mask, dtype=torch.bool)
    return bool((advantage[: len(mask)][mask] == 0).all())


class MetricTotals:
    """A step's metrics accumulated over micro-batches: token-weighted means, sums and maxima.

    `reduce` takes the collectives as arguments (`sum_fn`: element-wise sum over ranks of a
    float64 vector; `gather_fn`: every rank's Python object), so this stays free of
    torch.distributed; with the defaults it reduces one rank.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.summed: set[str] = set()
        self.maxima: dict[str, float] = {}

    def add(self, out: ObjectiveOutput) -> None:
        for key, value in out.metrics.items():
            kind = out.reductions.get(key, "mean")
            if kind == "max":
                self.maxima[key] = max(self.maxima.get(key, 0.0), value)
                continue
            summed = kind == "sum"
            if summed:
                self.summed.add(key)
            self.sums[key] = self.sums.get(key, 0.0) + (value if summed else value * out.weights[key])
            self.weights[key] = self.weights.get(key, 0.0) + (1.0 if summed else out.weights[key])

    def copy(self) -> MetricTotals:
        other = MetricTotals()
        other.sums, other.weights = dict(self.sums), dict(self.weights)
        other.summed, other.maxima = set(self.summed), dict(self.maxima)
        return other

    def reduce(
        self,
        num_samples: int,
        *,
        sum_fn: Callable[[Tensor], Tensor] = lambda values: values,
        gather_fn: Callable[[Any], list[Any]] = lambda obj: [obj],
    ) -> dict[str, float]:
        """The step's metrics over every micro-batch and rank, identical on every rank ({} when
        no micro-batch ran anywhere), with "batch/num_samples" the global sample count."""
        parts = gather_fn((sorted(self.sums), sorted(self.summed), self.maxima))
        keys = sorted({k for part in parts for k in part[0]})
        summed = {k for part in parts for k in part[1]}
        maxima: dict[str, float] = {}
        for part in parts:
            for k, v in part[2].items():
                maxima[k] = max(maxima.get(k, v), v)
        local = [self.sums.get(k, 0.0) for k in keys] + [self.weights.get(k, 0.0) for k in keys]
        values = sum_fn(torch.tensor(local + [float(num_samples)], dtype=torch.float64))
        if not keys:
            return {}
        n = len(keys)
        stats = {"batch/num_samples": float(values[-1])}
        for i, key in enumerate(keys):
            total, weight = float(values[i]), float(values[n + i])
            stats[key] = total if key in summed else total / max(weight, 1e-12)
        stats.update(maxima)
        return stats
