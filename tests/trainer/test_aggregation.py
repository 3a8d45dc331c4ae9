"""Aggregation modes: hand values, micro-batch invariance. Run: pytest tests/trainer/test_aggregation.py"""

import pytest
import torch

from trainer.aggregation import AGGREGATIONS, aggregate, count_tokens_and_seqs

# 2 x 3 example: row 0 has tokens 1, 2 valid (loss 1, 2); row 1 has 3 valid (4, 5, 6)
LOSS = torch.tensor([[1.0, 2.0, 99.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "mode, kw, expected",
    [
        ("token-mean", {}, 18 / 5),  # (1+2+4+5+6) / 5
        ("token-sum", {}, 18.0),  # 1+2+4+5+6, the masked 99 dropped, no normaliser
        ("token-sum", {"loss_scale_factor": 4.0}, 18.0),  # L is seq-mean-token-sum-norm's only
        ("seq-mean-token-sum", {}, (3 + 15) / 2),
        ("seq-mean-token-mean", {}, (1.5 + 5.0) / 2),
        ("seq-mean-token-sum-norm", {"loss_scale_factor": 4.0}, 18 / (2 * 4)),
    ],
)
def test_hand_values(mode, kw, expected):
    assert aggregate(LOSS, MASK, mode, **kw).item() == pytest.approx(expected)


def test_fully_masked_rows_do_not_count_as_sequences():
    loss = torch.cat([LOSS, torch.full((1, 3), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 3)])
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.25)
    assert count_tokens_and_seqs(mask) == (5, 2)


def test_sum_norm_requires_constant_and_names_config_key():
    with pytest.raises(ValueError, match="algo.aggregation.loss_scale_factor"):
        aggregate(LOSS, MASK, "seq-mean-token-sum-norm")


def test_unknown_mode_lists_modes():
    with pytest.raises(KeyError, match="seq-mean-token-mean"):
        aggregate(LOSS, MASK, "mean")


def test_registry_build_matches_aggregate():
    fn = AGGREGATIONS.build("seq-mean-token-sum-norm", {"loss_scale_factor": 4.0})
    assert fn(LOSS, MASK).item() == pytest.approx(18 / 8)


@pytest.mark.parametrize("mode", AGGREGATIONS.names())
def test_micro_batch_invariance(mode):
    """Two micro-batches with global counts: summed losses and accumulated grads == full batch."""
    torch.manual_seed(0)
    weights = torch.randn(5, 6, requires_grad=True)
    mask = (torch.rand(5, 6) > 0.4).float()
    mask[3] = 0  # a fully masked row
    kw = {"loss_scale_factor": 6.0}
    full = aggregate(weights**2, mask, mode, **kw)
    (full_grad,) = torch.autograd.grad(full, weights)

    num_tokens, num_seqs = count_tokens_and_seqs(mask)
    parts = [slice(0, 2), slice(2, 5)]
    total = sum(
        aggregate(weights[p] ** 2, mask[p], mode, num_tokens=num_tokens, num_seqs=num_seqs, **kw)
        for p in parts
    )
    (split_grad,) = torch.autograd.grad(total, weights)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(split_grad, full_grad)


def test_token_sum_ignores_counts_and_splits_by_hand():
    """token-sum needs no global count: each micro-batch's sum, added up, is the batch's."""
    row0 = aggregate(LOSS[:1], MASK[:1], "token-sum", num_tokens=5, num_seqs=2)
    row1 = aggregate(LOSS[1:], MASK[1:], "token-sum", num_tokens=5, num_seqs=2)
    assert (row0.item(), row1.item()) == (3.0, 15.0)  # unequal rows: 1+2 and 4+5+6
    assert (row0 + row1).item() == aggregate(LOSS, MASK, "token-sum").item() == 18.0
    # = token-mean * N_tokens = seq-mean-token-sum * N_seqs on the same batch
    assert aggregate(LOSS, MASK, "token-mean").item() * 5 == pytest.approx(18.0)
    assert aggregate(LOSS, MASK, "seq-mean-token-sum").item() * 2 == pytest.approx(18.0)


def test_token_sum_gradient_is_the_mask():
    loss = LOSS.clone().requires_grad_()
    (grad,) = torch.autograd.grad(aggregate(loss, MASK, "token-sum"), loss)
    torch.testing.assert_close(grad, MASK)  # weight 1 per sampled token, 0 on the masked one
