"""Chunked logprob/entropy kernels == naive path, values and grads. Run: pytest tests/trainer/test_logprobs.py"""

import math

import pytest
import torch

from trainer.logprobs import (
    clamped_entropy_from_logits,
    entropy_from_logits,
    logprobs_and_entropy_from_hidden,
    logprobs_from_logits,
    token_stats_from_hidden,
)


def test_logits_functions_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # row 0: p = (.5, .5): H = log 2; row 1: p = (.75, .25)
    torch.testing.assert_close(
        entropy_from_logits(logits),
        torch.tensor([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]),
    )
    torch.testing.assert_close(
        logprobs_from_logits(logits, torch.tensor([1, 0])), torch.tensor([math.log(0.5), math.log(0.75)])
    )
    # temperature 2 on row 1: z = (log 3 / 2, 0) -> p0 = sqrt3 / (sqrt3 + 1)
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    torch.testing.assert_close(
        logprobs_from_logits(logits[1:], torch.tensor([0]), 2.0), torch.tensor([math.log(p0)])
    )


def test_clamped_entropy_drops_smallest_logits():
    logits = torch.tensor([[3.0, 0.0, 1.0, 2.0]])
    # drop_frac .25 of V=4 -> drop the single smallest logit (0.0); entropy of softmax([3, 1, 2])
    expected = entropy_from_logits(torch.tensor([[3.0, 1.0, 2.0]]))
    torch.testing.assert_close(clamped_entropy_from_logits(logits, 0.25), expected)
    torch.testing.assert_close(clamped_entropy_from_logits(logits, 0.0), entropy_from_logits(logits))


def _naive(hidden, weight, labels, temperature):
    logits = hidden @ weight.t()
    return (
        logprobs_from_logits(logits, labels, temperature),
        entropy_from_logits(logits, temperature),
        clamped_entropy_from_logits(logits, 0.3, temperature),
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive_values_and_grads(temperature):
    g = torch.Generator().manual_seed(0)
    N, H, V = 10, 8, 97
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    up = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]

    ref = _naive(hidden, weight, labels, temperature)
    ref_grads = torch.autograd.grad(
        sum((o * u).sum() for o, u in zip(ref, up, strict=True)), [hidden, weight]
    )

    stats = token_stats_from_hidden(
        hidden, weight, labels, temperature=temperature, with_entropy=True, clamp_drop_frac=0.3, chunk_size=3
    )
    got = (stats.logprobs, stats.entropy, stats.clamped_entropy)
    got_grads = torch.autograd.grad(
        sum((o * u).sum() for o, u in zip(got, up, strict=True)), [hidden, weight]
    )
    for a, b in zip(got + got_grads, ref + ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_two_tuple_api_and_no_entropy():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 4, generator=g), torch.randn(11, 4, generator=g)
    labels = torch.randint(0, 11, (5,), generator=g)
    logprobs, entropy = logprobs_and_entropy_from_hidden(
        hidden, weight, labels, with_entropy=False, chunk_size=2
    )
    assert entropy is None
    torch.testing.assert_close(logprobs, logprobs_from_logits(hidden @ weight.t(), labels))
    _, entropy = logprobs_and_entropy_from_hidden(hidden, weight, labels, with_entropy=True, chunk_size=64)
    torch.testing.assert_close(entropy, entropy_from_logits(hidden @ weight.t()))


def test_bf16_inputs_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 8, generator=g).bfloat16()
    weight = torch.randn(13, 8, generator=g).bfloat16()
    labels = torch.randint(0, 13, (4,), generator=g)
    logprobs, entropy = logprobs_and_entropy_from_hidden(
        hidden, weight, labels, with_entropy=True, chunk_size=3
    )
    assert logprobs.dtype == torch.float32 and entropy.dtype == torch.float32
