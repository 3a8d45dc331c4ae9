"""The objective of one micro-batch (`trainer/objective.py`) on CPU, without DeepSpeed.

By hand on two rows (PPO-clip + an entropy bonus), the forking-token mask of the policy term
only, micro-batch invariance under every aggregation mode and under global batch statistics,
the registry flags that replaced the learner's name lists, and the metric reductions.

Run: .venv/bin/python -m pytest tests/trainer/test_objective.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.aggregation import AGGREGATIONS
from trainer.config import load
from trainer.losses import POLICY_LOSSES, LossInputs
from trainer.objective import Counts, MetricTotals, Objective, PrePass, all_zero_advantage

F64 = torch.float64


def objective(*overrides: str) -> Objective:
    return Objective(load(None, list(overrides)))


def entropy_bonus(coef: float) -> str:
    return f"algo.regularizers=[{{name: entropy_bonus, params: {{coef: {coef}}}}}]"


# -- a two-row example by hand ---------------------------------------------------------------


def two_rows() -> tuple[LossInputs, torch.Tensor, torch.Tensor]:
    """Row 0: 3 sampled tokens, A = +1, ratios 1, 1.5, 0.5; row 1: 2 sampled tokens and a
    masked one, A = -0.5, ratios 0.5, 1.1. Entropies 1, 2, 0.5 | 1.5, 0.25, (9, masked)."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=F64)
    old = torch.tensor([[-1.0, -1, -1], [-1, -1, 0]], dtype=F64)
    log_ratio = torch.tensor([[0.0, math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.1), 0]], dtype=F64)
    logprobs = (old + log_ratio).requires_grad_(True)
    entropy = torch.tensor([[1.0, 2.0, 0.5], [1.5, 0.25, 9.0]], dtype=F64, requires_grad=True)
    advantages = torch.tensor([[1.0, 1, 1], [-0.5, -0.5, 0]], dtype=F64)
    inputs = LossInputs(logprobs, old, advantages, mask, rollout_logprobs=old.clone(), entropy=entropy)
    return inputs, logprobs, entropy


def test_ppo_clip_with_an_entropy_bonus_by_hand():
    inputs, logprobs, entropy = two_rows()
    out = objective(entropy_bonus(0.1))(inputs, Counts(tokens=5, seqs=2, policy_tokens=5))
    # PPO-clip, eps 0.2: A=+1: -1 (r=1), -1.2 (r=1.5 clipped), -0.5 (r=0.5: the unclipped max);
    # A=-0.5: 0.4 (r=0.5 clipped to 0.8), 0.55 (r=1.1); token-mean over 5 tokens
    policy = (-1 - 1.2 - 0.5 + 0.4 + 0.55) / 5
    bonus = -0.1 * (1 + 2 + 0.5 + 1.5 + 0.25) / 5  # -coef * H, the masked 9 left out
    assert out.terms["loss/policy"] == pytest.approx(policy)
    assert out.terms["loss/entropy_bonus"] == pytest.approx(bonus)
    assert out.terms["loss/total"] == pytest.approx(policy + bonus)
    assert float(out.loss.detach()) == pytest.approx(policy + bonus)
    assert out.metrics["loss/clipfrac"] == pytest.approx(2 / 5)
    assert out.metrics["entropy/mean"] == pytest.approx(5.25 / 5)
    assert out.weights["loss/clipfrac"] == 5 and out.weights["entropy/mean"] == 5
    assert out.reductions == {"off_policy/log_ratio_abs_max": "max"}  # mu == pi_old here
    out.loss.backward()
    # d/d log pi of -A r / N where no clip binds; 0 where it does, and at the masked token
    expected = torch.tensor([[-1 / 5, 0, -0.5 / 5], [0, 0.5 * 1.1 / 5, 0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected)
    torch.testing.assert_close(entropy.grad, -0.1 / 5 * inputs.loss_mask)  # the bonus only


def test_the_forking_mask_is_the_policy_terms_only_with_its_own_denominator():
    inputs, logprobs, entropy = two_rows()
    obj = objective(entropy_bonus(0.1), "algo.forking_tokens=0.4")
    assert "entropy" in obj.needs
    # this micro-batch's own top ceil(0.4 * 5) = 2 by entropy: (0, 1) H=2 and (1, 0) H=1.5 (the
    # masked H=9 is never a candidate); its global count comes with the counts
    out = obj(inputs, Counts(tokens=5, seqs=2, policy_tokens=2))
    assert out.terms["loss/policy"] == pytest.approx((-1.2 + 0.4) / 2)
    assert out.terms["loss/entropy_bonus"] == pytest.approx(-0.1 * 5.25 / 5)  # the full mask
    assert out.metrics["loss/clipfrac"] == pytest.approx(1.0)  # both selected tokens are clipped
    assert out.weights["loss/clipfrac"] == 2 and out.weights["entropy/mean"] == 5
    out.loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0  # both selected tokens are clipped: no gradient
    torch.testing.assert_close(entropy.grad, -0.1 / 5 * inputs.loss_mask)  # every sampled token
    # a selection from a mini-batch threshold, with the mini-batch's count as denominator
    inputs, logprobs, _ = two_rows()
    selection = torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=F64)
    out = obj(inputs, Counts(tokens=5, seqs=2, policy_tokens=4), selection=selection)
    assert out.terms["loss/policy"] == pytest.approx(-1 / 4)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 4, 0, 0], [0, 0, 0]], dtype=F64))


def test_micro_batch_scope_counts_each_micro_batchs_own_top_fraction():
    obj = objective("algo.forking_tokens=0.2")
    masks = [torch.ones(2, 7), torch.tensor([[1.0, 0, 0]]), torch.zeros(1, 4)]
    view = obj.mini_batch_view(masks, num_tokens=15)
    assert not obj.pre_pass and view.selections is None and view.stats is None
    assert view.policy_tokens == math.ceil(0.2 * 14) + 1 + 0  # at least one of a non-empty one
    assert objective().mini_batch_view(masks, num_tokens=15).policy_tokens == 15  # no forking


# -- micro-batch invariance ------------------------------------------------------------------

LENGTHS = (6, 3, 5, 2)  # sampled tokens per row, before the masked ones below


def asymmetric_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """4 rows of unequal lengths, masked tokens inside rows, advantages of both signs and
    varying per token, ratios away from 1; float64 leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.zeros(B, T, dtype=F64)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    mask[0, 2] = mask[2, 1] = 0  # env tokens inside a response
    sign = torch.tensor([1.0, -0.7, 0.3, -1.2], dtype=F64)[:, None]
    advantages = sign * (1 + 0.1 * torch.arange(T, dtype=F64)) * mask
    logprobs = -torch.rand(B, T, generator=g, dtype=F64) * 2 - 0.05
    old = logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    return {
        "logprobs": logprobs.requires_grad_(True),
        "old_logprobs": old,
        "advantages": advantages,
        "loss_mask": mask,
        "rollout_logprobs": old + 0.1 * torch.randn(B, T, generator=g, dtype=F64),
        "ref_logprobs": old - 0.2,
        "entropy": (torch.rand(B, T, generator=g, dtype=F64) * 3 + 0.1).requires_grad_(True),
        "traj_ids": torch.arange(B),
    }


def rows_of(batch: dict[str, torch.Tensor], rows: list[int]) -> LossInputs:
    """A micro-batch of `rows`, trimmed to its own width, sharing the batch's leaves."""
    width = int(batch["loss_mask"][rows].sum(0).nonzero().max()) + 1
    return LossInputs(**{k: v[rows] if k == "traj_ids" else v[rows][:, :width] for k, v in batch.items()})


def counts_of(mask: torch.Tensor, policy_tokens: int | None = None) -> Counts:
    tokens, seqs = int((mask > 0).sum()), int((mask > 0).any(-1).sum())
    return Counts(tokens, seqs, tokens if policy_tokens is None else policy_tokens)


def grads(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [batch["logprobs"], batch["entropy"]], allow_unused=True))


SPLIT = [[0, 2], [3, 1]]


@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_micro_batches_with_global_counts_sum_to_the_whole(mode):
    obj = objective(
        f"algo.aggregation.mode={mode}",
        "algo.aggregation.loss_scale_factor=8.0",
        "algo.regularizers=[{name: entropy_bonus, params: {coef: 0.3}}, {name: kl, params: {coef: 0.2}}]",
        "algo.rollout_is=token",
    )
    batch = asymmetric_batch()
    counts = counts_of(batch["loss_mask"])
    whole = obj(rows_of(batch, [0, 1, 2, 3]), counts)
    parts = [obj(rows_of(batch, rows), counts) for rows in SPLIT]
    for key in obj.term_keys:
        assert sum(p.terms[key] for p in parts) == pytest.approx(whole.terms[key], rel=1e-12, abs=1e-12)
    assert abs(whole.terms["loss/policy"]) > 1e-3 and abs(whole.terms["loss/kl"]) > 1e-3
    for mine, theirs in zip(grads(whole.loss, batch), grads(sum(p.loss for p in parts), batch), strict=True):
        torch.testing.assert_close(theirs, mine)


# Global batch statistics: with the mini-batch's threshold and statistics, the split sums to the
# whole (Clip-Cov is left out: its drop is random, exact only in expectation).
GLOBAL = {
    "kl_cov": ("algo.loss.name=kl_cov", "algo.loss.params={kl_ratio: 0.3}"),
    "aepo": ("algo.loss.name=aepo",),
    "hapo": ("algo.loss.name=hapo",),
    "steer": ("algo.token_weights.name=steer", "algo.rollout_is=sequence"),
}


@pytest.mark.parametrize("terms", GLOBAL.values(), ids=GLOBAL.keys())
@pytest.mark.parametrize("forking", [0.0, 0.5])
def test_global_statistics_and_forking_threshold_do_not_depend_on_the_split(terms, forking):
    obj = objective(*terms, "algo.stats_scope=global", f"algo.forking_tokens={forking}", entropy_bonus(0.1))
    assert obj.pre_pass and obj.pre_pass_entropy == (forking > 0 or "kl_cov" not in terms[0])
    batch = asymmetric_batch(seed=1)
    totals = []
    for split in ([[0, 1, 2, 3]], SPLIT):
        micros = [rows_of(batch, rows) for rows in split]
        passes = [PrePass(m.logprobs.detach(), m.old_logprobs, m.advantages, m.entropy.detach()) for m in micros]
        view = obj.mini_batch_view([m.loss_mask for m in micros], counts_of(batch["loss_mask"]).tokens, passes)
        assert view.stats is not None and (view.selections is not None) == (forking > 0)
        counts = counts_of(batch["loss_mask"], view.policy_tokens)
        outs = [
            obj(m, counts, selection=None if view.selections is None else view.selections[k], stats=view.stats)
            for k, m in enumerate(micros)
        ]
        totals.append((view.policy_tokens, sum(o.loss for o in outs)))
    (count, whole), (split_count, split) = totals
    tokens = sum(LENGTHS) - 2
    assert split_count == count == (math.ceil(forking * tokens) if forking else tokens)
    assert float(split.detach()) == pytest.approx(float(whole.detach()), rel=1e-9, abs=1e-12)
    for mine, theirs in zip(grads(whole, batch), grads(split, batch), strict=True):
        torch.testing.assert_close(theirs, mine)


def test_micro_batch_scope_statistics_do_depend_on_the_split():
    """What the global scope buys: AEPO's z-scores over each micro-batch differ."""
    obj = objective("algo.loss.name=aepo")
    batch = asymmetric_batch(seed=1)
    counts = counts_of(batch["loss_mask"])
    whole = obj(rows_of(batch, [0, 1, 2, 3]), counts).loss
    split = sum(obj(rows_of(batch, rows), counts).loss for rows in SPLIT)
    assert abs(float(whole.detach()) - float(split.detach())) > 1e-4


# -- flags instead of name lists -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, skips",
    [
        ((), True),
        (("algo.loss.name=gspo",), True),
        (("algo.loss.name=kl_cov",), False),
        (("algo.loss.name=aepo",), False),
        (("algo.skip_zero_advantage=false",), False),
        ((entropy_bonus(0.1),), False),  # a regulariser sees the skipped tokens
        (("algo.token_weights.name=steer",), False),
        (("algo.forking_tokens=0.2",), False),
    ],
)
def test_skipping_zero_advantage_samples_follows_the_flags(overrides, skips):
    assert objective(*overrides).skips_zero_advantage is skips


def test_only_ppo_clip_and_gspo_are_flagged_zero_at_zero_advantage():
    flagged = {n for n in POLICY_LOSSES.names() if POLICY_LOSSES.get(n).flags.get("zero_at_zero_advantage")}
    assert flagged == {"ppo_clip", "gspo"}


def zero_row_batch() -> dict[str, torch.Tensor]:
    batch = asymmetric_batch(seed=2)
    batch["advantages"] = batch["advantages"].clone()
    batch["advantages"][1] = 0  # row 1: every advantage 0, a sample the learner may skip
    return batch


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
def test_a_loss_flagged_zero_at_zero_advantage_is_unchanged_without_those_samples(name):
    """What the flag promises: dropping an all-zero-advantage row (with the mini-batch's counts,
    as the learner keeps them) changes neither the loss nor any gradient."""
    obj = objective(f"algo.loss.name={name}")
    batch = zero_row_batch()
    assert all_zero_advantage([1] * LENGTHS[1], batch["advantages"][1])
    assert not all_zero_advantage([1] * LENGTHS[0], batch["advantages"][0])
    counts = counts_of(batch["loss_mask"])
    whole = obj(rows_of(batch, [0, 1, 2, 3]), counts).loss
    kept = obj(rows_of(batch, [0, 2, 3]), counts).loss
    assert float(kept.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    (full_grad, _), (kept_grad, _) = grads(whole, batch), grads(kept, batch)
    assert full_grad is not None and kept_grad is not None
    assert torch.count_nonzero(full_grad[1]) == 0
    torch.testing.assert_close(kept_grad, full_grad)


@pytest.mark.parametrize("name, params", [("kl_cov", "{kl_ratio: 0.3}"), ("aepo", "{}")])
def test_a_loss_not_flagged_depends_on_the_zero_advantage_samples(name, params):
    """KL-Cov penalises tokens by their covariance about the batch means (those of a
    zero-advantage row too) and AEPO z-scores entropy over the batch (so a zero-advantage row
    moves the other rows' loss): dropping such a row changes the update, they are not skippable."""
    obj = objective(f"algo.loss.name={name}", f"algo.loss.params={params}")
    assert not obj.skips_zero_advantage
    batch = zero_row_batch()
    counts = counts_of(batch["loss_mask"])
    whole = obj(rows_of(batch, [0, 1, 2, 3]), counts).loss
    kept = obj(rows_of(batch, [0, 2, 3]), counts).loss
    (full_grad, _), (kept_grad, _) = grads(whole, batch), grads(kept, batch)
    assert (kept_grad - full_grad).abs().max() > 1e-6


# -- metrics and their reductions ------------------------------------------------------------


def test_metrics_reduce_as_their_terms_declare():
    """Token means weigh micro-batches by their tokens, BAPO's grid sums (flag reduce_metrics)
    add up, the largest |log pi_old - log mu| is a maximum: over a split, the whole's values."""
    obj = objective("algo.loss.name=bapo", "algo.loss.params={scope: step}", entropy_bonus(0.1))
    assert set(obj.controllers) == {"policy"}
    batch = asymmetric_batch(seed=3)
    counts = counts_of(batch["loss_mask"])
    whole = obj(rows_of(batch, [0, 1, 2, 3]), counts)
    grid = [k for k in whole.metrics if k.startswith("bapo/")]
    assert grid and all(whole.reductions[k] == "sum" for k in grid)
    assert whole.reductions["off_policy/log_ratio_abs_max"] == "max"
    totals = MetricTotals()
    for rows in SPLIT:
        totals.add(obj(rows_of(batch, rows), counts))
    stats = totals.reduce(num_samples=4)
    assert stats["batch/num_samples"] == 4
    for key in grid + ["entropy/mean", "off_policy/log_ratio_abs_max", "off_policy/kl_k3"]:
        assert stats[key] == pytest.approx(whole.metrics[key], rel=1e-9, abs=1e-12), key
    assert MetricTotals().reduce(num_samples=4) == {}  # no micro-batch: nothing for controllers
