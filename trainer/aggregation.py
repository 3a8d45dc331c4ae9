"""Reduce a per-token loss matrix [B, T] to a scalar: the normalisation is its own named choice.

Modes (verl's `loss_agg_mode` names, verl/trainer/ppo/core_algos.py `agg_loss`), registered in
`AGGREGATIONS`, with m the loss mask and l the per-token loss:
  token-mean               sum_{i,t} m l / N_tokens                  (DAPO, arXiv:2503.14476)
  token-sum                sum_{i,t} m l                             (no normaliser at all)
  seq-mean-token-sum       sum_i (sum_t m l) / N_seqs
  seq-mean-token-mean      sum_i (sum_t m l / sum_t m) / N_seqs      (GRPO, arXiv:2402.03300)
  seq-mean-token-sum-norm  sum_{i,t} m l / (N_seqs * L), L = constant `loss_scale_factor`
                                                                     (Dr.GRPO, arXiv:2503.20783)

Gradient-accumulation invariance: pass `num_tokens` / `num_seqs` counted over the WHOLE
mini-batch (all micro-batches, all ranks; see `count_tokens_and_seqs`). Then the sum of the
micro-batch results equals the full-batch loss, and each micro-batch's backward can simply be
accumulated (with data parallelism that averages gradients, multiply by the world size, as
verl's `agg_loss` does with `dp_size`; the learner does it in `trainer/learner/common.py` `accumulate_gradients`).
Left at None they default to the local counts of the given matrix. Rows with no sampled token
never count as sequences. token-sum needs no count: a sum of micro-batch sums is the batch sum.

`loss_scale_factor` is read by seq-mean-token-sum-norm only (its constant L); every other mode,
token-sum included, ignores it, as verl's `agg_loss` does.

Note on seq-mean-token-sum-norm: the Dr.GRPO objective is (1/G) sum_i (1/L) sum_t, so we divide
by the number of sequences as well as by L (the loss scale does not grow with the batch size).
verl's `agg_loss` has, across versions, divided by L alone (a loss that grows with the batch
size) or by the global sequence count and L; this is the latter. verl also falls back to the
padded width for a missing L in some versions; here a missing L is an error.

This module knows nothing about distribution: the caller all-reduces the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.registry import Registry

AGGREGATIONS = Registry("aggregation mode")


@dataclass(frozen=True)
class SumNormParams:
    loss_scale_factor: float | None = None  # constant L, e.g. the max response length


def count_tokens_and_seqs(loss_mask: Tensor) -> tuple[int, int]:
    """(number of sampled tokens, number of rows with at least one) of a [B, T] mask.

    Sum these over micro-batches (and ranks) to get the global counts `aggregate` expects.
    """
    valid = loss_mask > 0
    return int(valid.sum()), int(valid.any(dim=-1).sum())


def _masked(per_token_loss: Tensor, loss_mask: Tensor) -> Tensor:
    return torch.where(loss_mask > 0, per_token_loss, torch.zeros_like(per_token_loss))


def _local_seqs(loss_mask: Tensor) -> Tensor:
    return (loss_mask > 0).any(dim=-1).sum()


@AGGREGATIONS.register("token-mean")
def token_mean(
    per_token_loss: Tensor, loss_mask: Tensor, *, num_tokens=None, num_seqs=None, params=None
) -> Tensor:
    """sum_{i,t} m l / N_tokens: every token weighs the same across the batch (DAPO,
    arXiv:2503.14476; verl's default `token-mean`)."""
    if num_tokens is None:
        num_tokens = (loss_mask > 0).sum()
    return _masked(per_token_loss, loss_mask).sum() / _at_least_one(num_tokens)


@AGGREGATIONS.register("token-sum")
def token_sum(
    per_token_loss: Tensor, loss_mask: Tensor, *, num_tokens=None, num_seqs=None, params=None
) -> Tensor:
    """sum_{i,t} m l, divided by nothing: verl's `token-sum` (core_algos `agg_loss`; verl is
    HybridFlow, arXiv 2409.19256). No paper of its own.

    Every token weighs the same and the loss grows with the number of tokens in the mini-batch,
    so the step size scales with the batch's token count (pick the learning rate for it).
    `num_tokens` / `num_seqs` are accepted for a uniform signature and ignored: the sum over
    micro-batches (and ranks, with the learner's world-size factor that undoes DP gradient
    averaging, verl's `* dp_size`) already equals the whole mini-batch's sum.
    `loss_scale_factor` does not apply (verl's token-sum reads none either); for a sum divided
    by a constant, use seq-mean-token-sum-norm.
    """
    return _masked(per_token_loss, loss_mask).sum()


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(
    per_token_loss: Tensor, loss_mask: Tensor, *, num_tokens=None, num_seqs=None, params=None
) -> Tensor:
    """mean over sequences of sum_t m l (longer sequences weigh more): verl's `seq-mean-token-sum`
    (HybridFlow, arXiv 2409.19256); no paper of its own."""
    if num_seqs is None:
        num_seqs = _local_seqs(loss_mask)
    return _masked(per_token_loss, loss_mask).sum() / _at_least_one(num_seqs)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(
    per_token_loss: Tensor, loss_mask: Tensor, *, num_tokens=None, num_seqs=None, params=None
) -> Tensor:
    """mean over sequences of the per-sequence token mean (original GRPO, arXiv:2402.03300)."""
    if num_seqs is None:
        num_seqs = _local_seqs(loss_mask)
    tokens_per_seq = (loss_mask > 0).sum(dim=-1).clamp_min(1)
    seq_means = _masked(per_token_loss, loss_mask).sum(dim=-1) / tokens_per_seq
    return seq_means.sum() / _at_least_one(num_seqs)


@AGGREGATIONS.register("seq-mean-token-sum-norm", params=SumNormParams)
def seq_mean_token_sum_norm(
    per_token_loss: Tensor, loss_mask: Tensor, *, num_tokens=None, num_seqs=None, params: SumNormParams
) -> Tensor:
    """sum_{i,t} m l / (N_seqs * L) with a constant L (Dr.GRPO, arXiv:2503.20783)."""
    if params is None or params.loss_scale_factor is None:
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' needs a constant normaliser: set "
            "algo.aggregation.loss_scale_factor (e.g. the max response length)"
        )
    if num_seqs is None:
        num_seqs = _local_seqs(loss_mask)
    total = _masked(per_token_loss, loss_mask).sum()
    return total / (_at_least_one(num_seqs) * params.loss_scale_factor)


def _at_least_one(count):
    if isinstance(count, Tensor):
        return count.clamp_min(1)
    return max(count, 1)


def aggregate(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    mode: str,
    *,
    num_tokens: int | Tensor | None = None,
    num_seqs: int | Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """Reduce `per_token_loss` [B, T] to a scalar with the named `mode` (see module docstring).

    `num_tokens` / `num_seqs`: global counts over the whole mini-batch for gradient
    accumulation invariance; None = local counts (token-sum reads neither). `loss_scale_factor`:
    the constant L of seq-mean-token-sum-norm (required there, ignored by the other modes).
    """
    entry = AGGREGATIONS.get(mode)
    params = None
    if entry.params is SumNormParams:
        params = SumNormParams(loss_scale_factor=loss_scale_factor)
    return entry.fn(per_token_loss, loss_mask, num_tokens=num_tokens, num_seqs=num_seqs, params=params)
