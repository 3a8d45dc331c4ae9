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
