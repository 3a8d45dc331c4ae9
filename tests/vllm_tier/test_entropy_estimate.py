"""The top-k entropy estimator of the vLLM engine (agents/engines/vllm.py: estimate_entropy).

Pure numpy: runs in the main venv too (vLLM is imported lazily, only by VLLMEngine).

Run: .venv/bin/python -m pytest tests/vllm_tier/test_entropy_estimate.py -q
"""

import math

import numpy as np
import pytest

from agents.engines.vllm import estimate_entropy


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def top_k_view(p, k):
    """(top-k logprobs [1, k], extra [1]) as vLLM would report them for distribution p."""
    order = np.argsort(-p)[:k]
    with np.errstate(divide="ignore"):
        return np.log(p[order])[None, :], np.array([-np.inf])


def test_a_fully_known_distribution_is_exact():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    top, extra = top_k_view(p, 4)
    est = estimate_entropy(top, extra, support=4)
    assert est.entropy[0] == pytest.approx(entropy(p), abs=1e-9)
    assert est.tail_mass[0] == pytest.approx(0.0, abs=1e-12)
    assert est.lower[0] == pytest.approx(est.upper[0], abs=1e-9)


def test_filtered_tokens_minus_inf_mean_nothing_is_left():
    """top-k/top-p filtered logprobs are -inf: a -inf inside the list means the support ended."""
    top = np.log(
        np.array([[0.7, 0.3, 0.0, 0.0]]) + 0.0,
        where=np.array([[True, True, False, False]]),
        out=np.full((1, 4), -np.inf),
    )
    est = estimate_entropy(top, np.array([-np.inf]), support=50_000)
    assert est.entropy[0] == pytest.approx(entropy(np.array([0.7, 0.3])), abs=1e-9)


def test_uniform_tail_is_recovered_when_the_tail_is_flat():
    """The tail is as flat as it can be (every tail token at p_k): the estimate is the truth."""
    k, v = 4, 1000
    head = np.array([0.3, 0.2, 0.1])
    rest = (1 - head.sum()) / (v - 3)  # p_k == every tail probability
    p = np.concatenate([head, np.full(v - 3, rest)])
    top, extra = top_k_view(p, k)
    est = estimate_entropy(top, extra, support=v)
    assert est.entropy[0] == pytest.approx(entropy(p), abs=1e-6)
    assert est.upper[0] == pytest.approx(entropy(p), abs=1e-6)


def test_power_law_tail_is_recovered():
    """A Zipf distribution continues past rank k exactly as the estimator assumes."""
    v, k, a = 5000, 20, 1.3
    p = np.arange(1, v + 1, dtype=np.float64) ** -a
    p /= p.sum()
    top, extra = top_k_view(p, k)
    est = estimate_entropy(top, extra, support=v)
    assert est.entropy[0] == pytest.approx(entropy(p), abs=0.02)
    assert est.lower[0] < entropy(p) < est.upper[0]


def test_the_bounds_hold_on_random_distributions():
    rng = np.random.default_rng(0)
    v, k = 2000, 10
    tops, extras, exact = [], [], []
    for _ in range(200):
        logits = rng.standard_normal(v) * rng.uniform(0.5, 6.0)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p)
        tops.append(np.log(p[order[:k]]))
        sampled = rng.choice(v, p=p)  # the sampled token: known even when outside the top-k
        extras.append(np.log(p[sampled]) if sampled not in order[:k] else -np.inf)
        exact.append(entropy(p))
    est = estimate_entropy(np.array(tops), np.array(extras), support=v)
    exact = np.array(exact)
    assert np.all(est.lower <= exact + 1e-9) and np.all(exact <= est.upper + 1e-9)
    assert np.all(est.lower <= est.entropy) and np.all(est.entropy <= est.upper)
    # closer to the truth than the uniform-tail bound on average
    assert np.abs(est.entropy - exact).mean() < np.abs(est.upper - exact).mean()


def test_known_sampled_token_outside_the_top_k_counts():
    v = 100
    p = np.full(v, 0.7 / 99)  # one big token, then flat: the tail is at p_k, as assumed
    p[0] = 0.3
    top, _ = top_k_view(p, 2)
    alone = estimate_entropy(top, np.array([-np.inf]), support=v)
    with_extra = estimate_entropy(top, np.array([math.log(p[50])]), support=v)
    assert with_extra.tail_mass[0] == pytest.approx(alone.tail_mass[0] - p[50])
    assert with_extra.entropy[0] == pytest.approx(entropy(p), abs=1e-6)  # the tail is still flat


def test_rejects_an_empty_top_k():
    with pytest.raises(ValueError, match=r"\[n, k>=1\]"):
        estimate_entropy(np.zeros((3, 0)), np.zeros(3), support=10)
