"""KL estimators (`trainer/regularizers.kl_estimate`): hand values of k1/k2/k3/abs, and the
straight-through k1+/k3+ (value of k1/k3, gradient of k2) checked with autograd; the `kl`
regulariser and `algo.kl_in_reward` accept every kind; a bogus kind names the valid ones.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_kl_estimators.py -q
"""

import math

import pytest
import torch

from trainer.config import ConfigError, load
from trainer.losses import LossInputs
from trainer.regularizers import KL_KINDS, REGULARIZERS, kl_estimate, kl_in_reward

E = math.exp
# 2 x 3, unequal row lengths (row 1's last token is padding with junk values), log ratios
# r = log pi - log ref of both signs and different sizes: row 0 [0.5, -1, 0], row 1 [-2, 0.25, *]
LOGPROBS = [[-1.0, -2.0, -0.5], [-3.0, -0.25, 7.0]]
REF = [[-1.5, -1.0, -0.5], [-1.0, -0.5, -40.0]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
R = [[0.5, -1.0, 0.0], [-2.0, 0.25, 47.0]]


def _lp():
    return torch.tensor(LOGPROBS, dtype=torch.float64, requires_grad=True)


def _ref():
    return torch.tensor(REF, dtype=torch.float64)


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _k3(r):  # exp(d) - d - 1 with d = -r
    return E(-r) + r - 1


VALID = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # (1, 2) is padding


def _valid(x):
    return torch.stack([x[i, j] for i, j in VALID])


def test_kinds_are_the_regulariser_literal():
    assert KL_KINDS == ("k1", "k2", "k3", "abs", "k1+", "k3+")


@pytest.mark.parametrize(
    "kind, expected, grad",
    [
        # value and d/dlogpi, per valid token (r = 0.5, -1, 0, -2, 0.25)
        ("k1", [0.5, -1.0, 0.0, -2.0, 0.25], [1.0] * 5),
        ("k2", [0.125, 0.5, 0.0, 2.0, 0.03125], [0.5, -1.0, 0.0, -2.0, 0.25]),
        (
            "k3",
            [E(-0.5) - 0.5, E(1) - 2, 0.0, E(2) - 3, E(-0.25) - 0.75],
            # d/dlogpi (exp(-r) + r - 1) = 1 - exp(-r)
            [1 - E(-0.5), 1 - E(1), 0.0, 1 - E(2), 1 - E(-0.25)],
        ),
        ("abs", [0.5, 1.0, 0.0, 2.0, 0.25], [1.0, -1.0, 0.0, -1.0, 1.0]),  # sign(r), 0 at 0
        ("k1+", [0.5, -1.0, 0.0, -2.0, 0.25], [0.5, -1.0, 0.0, -2.0, 0.25]),
        ("k3+", [E(-0.5) - 0.5, E(1) - 2, 0.0, E(2) - 3, E(-0.25) - 0.75], [0.5, -1.0, 0.0, -2.0, 0.25]),
    ],
)
def test_hand_values_and_gradients(kind, expected, grad):
    lp = _lp()
    kl = kl_estimate(lp, _ref(), kind, clamp=None)
    torch.testing.assert_close(_valid(kl), _t(expected))
    (g,) = torch.autograd.grad((kl * MASK).sum(), lp)
    torch.testing.assert_close(_valid(g), _t(grad))
    assert g[1, 2] == 0  # a masked token gets no gradient


@pytest.mark.parametrize("plus, base", [("k1+", "k1"), ("k3+", "k3")])
def test_straight_through_value_is_base_gradient_is_k2(plus, base):
    lp = _lp()
    value = kl_estimate(lp, _ref(), plus, clamp=None)
    assert torch.equal(value.detach(), kl_estimate(lp, _ref(), base, clamp=None).detach())
    # the gradient of sum_t w_t k_t with unequal weights is w_t * (logpi - logref)
    w = _t([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    (g_plus,) = torch.autograd.grad((w * value).sum(), lp)
    (g_k2,) = torch.autograd.grad((w * kl_estimate(lp, _ref(), "k2")).sum(), lp)
    torch.testing.assert_close(g_plus, g_k2)
    torch.testing.assert_close(g_plus, w * _t(R))
    (g_base,) = torch.autograd.grad((w * kl_estimate(lp, _ref(), base, clamp=None)).sum(), lp)
    assert not torch.allclose(g_plus, g_base)  # the "+" really changes the gradient


def test_k3_clamp_binds_on_the_value_only_for_k3_plus():
    # clamp 1: k3 at r = -2 is e^2 - 3 = 4.39 -> 1; the others are below 1 and unchanged
    lp = _lp()
    k3 = kl_estimate(lp, _ref(), "k3", clamp=1.0)
    k3p = kl_estimate(lp, _ref(), "k3+", clamp=1.0)
    expected = [E(-0.5) - 0.5, E(1) - 2, 0.0, 1.0, E(-0.25) - 0.75]
    torch.testing.assert_close(_valid(k3), _t(expected))
    torch.testing.assert_close(_valid(k3p), _t(expected))
    (g3,) = torch.autograd.grad((k3 * MASK).sum(), lp)
    (g3p,) = torch.autograd.grad((k3p * MASK).sum(), lp)
    assert g3[1, 0] == 0  # the clamped k3 has no gradient there
    assert g3p[1, 0] == -2.0  # k3+ still pushes k2's gradient r = -2 (as verl does)


def test_clamp_is_ignored_by_the_other_kinds():
    for kind in ("k1", "k2", "abs", "k1+"):
        torch.testing.assert_close(
            kl_estimate(_lp(), _ref(), kind, clamp=0.1), kl_estimate(_lp(), _ref(), kind, clamp=None)
        )


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match=r"k1, k2, k3, abs, k1\+, k3\+"):
        kl_estimate(_lp(), _ref(), "low_var_kl")


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_regulariser_accepts_every_kind(kind):
    lp = _lp()
    inputs = LossInputs(
        logprobs=lp,
        old_logprobs=lp.detach(),
        advantages=torch.zeros_like(lp),
        loss_mask=MASK,
        ref_logprobs=_ref(),
    )
    out = REGULARIZERS.build("kl", {"coef": 0.1, "kind": kind, "clamp": None})(inputs)
    expected = 0.1 * kl_estimate(lp, _ref(), kind, clamp=None) * MASK
    torch.testing.assert_close(out.per_token_loss, expected)
    base = kind.rstrip("+")
    assert out.metrics["loss/kl_ref"].item() == pytest.approx(
        float((kl_estimate(lp.detach(), _ref(), base, clamp=None) * MASK).sum() / 5)
    )
    if kind.endswith("+"):  # the loss's gradient is coef * r on valid tokens, 0 on the padding
        (g,) = torch.autograd.grad(out.per_token_loss.sum(), lp)
        torch.testing.assert_close(g, 0.1 * _t(R) * MASK)


def test_kl_regulariser_rejects_a_bogus_kind_naming_the_kinds():
    with pytest.raises(TypeError, match=r"'abs', 'k1\+', 'k3\+'"):
        REGULARIZERS.build("kl", {"kind": "k4"})


def test_kl_in_reward_abs_by_hand_and_plus_equals_base():
    rewards = torch.tensor([1.0, 0.0])
    lp, ref, mask = torch.tensor(LOGPROBS), torch.tensor(REF), MASK.float()
    seq, tokens, metrics = kl_in_reward(rewards, lp, ref, mask, coef=0.1, kind="abs")
    # |r|: row 0 [0.5, 1, 0] -> 0.15; row 1 [2, 0.25] -> 0.225 (the padding's 47 is dropped)
    torch.testing.assert_close(seq, torch.tensor([1.0 - 0.15, -0.225]))
    torch.testing.assert_close(tokens, torch.tensor([[-0.05, -0.1, 1.0], [-0.2, -0.025, 0.0]]))
    assert metrics["kl/ref_in_reward"] == pytest.approx(3.75 / 5)
    for plus, base in (("k1+", "k1"), ("k3+", "k3")):
        a = kl_in_reward(rewards, lp, ref, mask, 0.1, plus, clamp=1.0)
        b = kl_in_reward(rewards, lp, ref, mask, 0.1, base, clamp=1.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_kl_in_reward_carries_no_gradient():
    lp = torch.tensor(LOGPROBS, requires_grad=True)
    seq, tokens, _ = kl_in_reward(torch.zeros(2), lp, torch.tensor(REF), MASK.float(), 0.1, "k3+")
    assert not seq.requires_grad and not tokens.requires_grad


@pytest.mark.parametrize("kind", KL_KINDS)
def test_config_accepts_every_kind(kind):
    cfg = load(None, [f"algo.kl_in_reward.kind={kind}", "algo.kl_in_reward.coef=0.01"])
    assert cfg.algo.kl_in_reward.kind == kind


def test_config_rejects_a_bogus_kind_naming_every_kind():
    with pytest.raises(ConfigError, match="algo.kl_in_reward.kind='low_var_kl'") as err:
        load(None, ["algo.kl_in_reward.kind=low_var_kl"])
    for kind in KL_KINDS:  # the config's list stays the estimator's
        assert kind in str(err.value)
    assert str(err.value).endswith(", ".join(KL_KINDS))
