"""Policy losses, token weights and regularisers against hand-computed values (masking invariance of
every registered term is in test_signatures.py). Run: pytest tests/trainer/test_losses.py"""

import math

import pytest
import torch

from trainer.controllers import AdaptiveKLController, AEntController, EPOController, make_controller
from trainer.losses import (
    POLICY_LOSSES,
    TOKEN_WEIGHTS,
    LossInputs,
    bapo_contributions,
    bapo_grid,
    bapo_search,
    forking_token_mask,
    hapo_entropy_signal,
    with_token_weights,
)
from trainer.regularizers import REGULARIZERS, kl_estimate, top_p_entropy_from_logits

LOG = math.log


def _inputs(ratios, advantages, loss_mask=None, **kw):
    """One row; old_logprobs = 0, logprobs = log(ratio) so that r = ratio exactly."""
    logprobs = torch.tensor([[LOG(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=torch.zeros_like(logprobs),
        advantages=torch.tensor([advantages], dtype=torch.float64),
        loss_mask=torch.ones_like(logprobs)
        if loss_mask is None
        else torch.tensor([loss_mask], dtype=torch.float64),
        **kw,
    )


# tokens: (r=2, A=+1) clipped high; (r=.5, A=+1) inside; (r=.5, A=-1) clipped low;
#         (r=5, A=-1) dual clip at c=3; (r=2, A=-1) unclipped (2 < 3)
RATIOS = [2.0, 0.5, 0.5, 5.0, 2.0]
ADVS = [1.0, 1.0, -1.0, -1.0, -1.0]


def test_ppo_clip_hand_values_and_zero_grad_where_clipped():
    inputs = _inputs(RATIOS, ADVS)
    out = POLICY_LOSSES.build("ppo_clip")(inputs)
    # max(-A r, -A clip(r, .8, 1.2)): -1.2 | -0.5 | 0.8 | min(5, 3)=3 | 2
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.2, -0.5, 0.8, 3.0, 2.0]], dtype=torch.float64)
    )
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    # d(-A r)/dlogp = -A r where unclipped, 0 where any clip binds
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5, 0.0, 0.0, 2.0]], dtype=torch.float64))
    assert out.metrics["loss/clipfrac"].item() == pytest.approx(2 / 5)
    assert out.metrics["loss/clipfrac_dual"].item() == pytest.approx(1 / 5)
    k3 = [r - 1 - LOG(r) for r in RATIOS]
    assert out.metrics["loss/approx_kl"].item() == pytest.approx(sum(k3) / 5)
    assert out.metrics["loss/ratio_mean"].item() == pytest.approx(sum(RATIOS) / 5)
    assert not any(m.requires_grad for m in out.metrics.values())


def test_clip_higher_and_no_dual_clip():
    out = POLICY_LOSSES.build("ppo_clip", {"clip_high": 0.28, "dual_clip": None})(_inputs(RATIOS, ADVS))
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.28, -0.5, 0.8, 5.0, 2.0]], dtype=torch.float64)
    )
    assert out.metrics["loss/clipfrac_dual"].item() == 0.0


def test_token_weights_scale_loss():
    weights = torch.tensor([[1.0, 2.0, 0.0, 1.0, 0.5]], dtype=torch.float64)
    out = POLICY_LOSSES.build("ppo_clip")(_inputs(RATIOS, ADVS, token_weights=weights))
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.2, -1.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    )


def test_loss_inputs_shape_error_names_field():
    with pytest.raises(ValueError, match="advantages"):
        LossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_gspo_sequence_ratio():
    # valid log-ratios [log 2, 0] -> s = exp(log 2 / 2) = sqrt 2 on both tokens; token 3 masked
    def make():
        return _inputs([2.0, 1.0, 7.0], [1.0, 1.0, 1.0], loss_mask=[1, 1, 0])

    inputs = make()
    out = POLICY_LOSSES.build("gspo", {"clip_low": 10.0, "clip_high": 10.0})(inputs)
    s = math.sqrt(2)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-s, -s, 0.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    # per token: -A * s * grad log pi (the sequence ratio is a constant in the gradient)
    torch.testing.assert_close(grad, torch.tensor([[-s, -s, 0.0]], dtype=torch.float64))
    inputs = make()
    out = POLICY_LOSSES.build("gspo", {"clip_low": 0.2, "clip_high": 0.2})(inputs)  # s clipped at 1.2
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-1.2, -1.2, 0.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    assert (grad == 0).all()
    assert POLICY_LOSSES.build("gspo").flags["aggregation"] == "seq-mean-token-mean"


def _cov_inputs(old_shift=(0.0, 0.0, 0.0, 0.0)):
    # A = [2, -1, -1, 0] (mean 0), logprobs [-1, -3, -2, -2] (mean -2) -> Cov = [2, 1, 0, 0]
    logprobs = torch.tensor([[-1.0, -3.0, -2.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = logprobs.detach() - torch.tensor([old_shift], dtype=torch.float64)
    adv = torch.tensor([[2.0, -1.0, -1.0, 0.0]], dtype=torch.float64)
    return LossInputs(logprobs, old, adv, torch.ones_like(adv))


def test_clip_cov_drops_the_single_candidate():
    # r = 1 everywhere (nothing PPO-clipped); only token 0 has lb=1 < Cov < 5 -> dropped
    inputs = _cov_inputs()
    out = POLICY_LOSSES.build("clip_cov")(inputs)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
    assert out.metrics["loss/cov_dropped_frac"].item() == pytest.approx(0.25)


def test_kl_cov_penalises_top_covariance_token():
    # k = max(1, int(.25 * 4)) = 1 -> token 0 (Cov 2); its log r = .5: -2 e^.5 + 1.0 * .5
    inputs = _cov_inputs(old_shift=(0.5, 0.0, 0.0, 0.0))
    out = POLICY_LOSSES.build("kl_cov", {"kl_ratio": 0.25})(inputs)
    e = math.exp(0.5)
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-2 * e + 0.5, 1.0, 1.0, 0.0]], dtype=torch.float64)
    )
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-2 * e + 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))


def test_aepo_keeps_gradient_above_upper_clip():
    # (r=2, A=+1): forward -1.2 as PPO, gradient -(1 + .2) instead of 0; (r=.5, A=-1): clipped, 0
    inputs = _inputs([2.0, 0.5], [1.0, -1.0])
    out = POLICY_LOSSES.build("aepo", {"entropy_adv_coef": 0.0})(inputs)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-1.2, 0.8]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    torch.testing.assert_close(grad, torch.tensor([[-1.2, 0.0]], dtype=torch.float64))
    assert not POLICY_LOSSES.build("aepo", {"entropy_adv_coef": 0.0}).needs_entropy
    assert POLICY_LOSSES.build("aepo").needs_entropy


def test_aepo_entropy_aware_advantage():
    # entropy [1, 3]: mean 2, unbiased std sqrt 2 -> z = -+.7071; A (1 + .2 z) with A = 1, r = 1
    entropy = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    out = POLICY_LOSSES.build("aepo")(_inputs([1.0, 1.0], [1.0, 1.0], entropy=entropy))
    z = 1 / math.sqrt(2)
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-(1 - 0.2 * z), -(1 + 0.2 * z)]], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="entropy"):
        POLICY_LOSSES.build("aepo")(_inputs([1.0], [1.0]))


def test_forking_token_mask():
    entropy = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.3, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 5.0 is on a masked token
    # N = 5 valid, k = ceil(.4 * 5) = 2 -> .9 and .7
    torch.testing.assert_close(
        forking_token_mask(entropy, mask, 0.4), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(
        forking_token_mask(entropy, mask, threshold=0.5), torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    )


def test_kl_estimators_hand_values():
    # logp = log .5, ref = log .25: d = -log 2 -> k1 = log 2, k2 = (log 2)^2 / 2, k3 = .5 + log 2 - 1
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    l2 = math.log(2)
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(l2)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(l2**2 / 2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(0.5 + l2 - 1)
    out = REGULARIZERS.build("kl", {"coef": 0.1, "kind": "k1"})(
        _inputs([1.0], [0.0], ref_logprobs=torch.tensor([[-l2]], dtype=torch.float64))
    )
    # logprobs = log 1 = 0, ref = -log 2 -> k1 = log 2
    assert out.per_token_loss.item() == pytest.approx(0.1 * l2)


def test_entropy_bonus_and_aent():
    entropy = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    out = REGULARIZERS.build("entropy_bonus", {"coef": 0.01})(
        _inputs([1.0, 1.0], [0.0, 0.0], entropy=entropy)
    )
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-0.005, -0.02]], dtype=torch.float64))
    aent = REGULARIZERS.build("aent")
    assert aent.needs == {"clamped_entropy"}
    out = aent(_inputs([1.0, 1.0], [0.0, 0.0], clamped_entropy=entropy), coef=0.1)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-0.05, -0.2]], dtype=torch.float64))


@pytest.mark.parametrize(
    "penalty, loss, grad",
    [
        # P = [relu(.6 - .5), relu(3 - 2), 0] = [.1, 1, 0]; loss = -(H - 1.5 * .1 * P)
        ("hinge", [-0.485, -2.85, -1.0], [-1.15, -0.85, -1.0]),
        # P = 1[H <= .6 or H >= 2] = [1, 1, 0], constant: gradient is the plain bonus
        ("indicator", [-0.35, -2.85, -1.0], [-1.0, -1.0, -1.0]),
    ],
)
def test_epo_regularizer(penalty, loss, grad):
    entropy = torch.tensor([[0.5, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    params = {"coef": 1.0, "alpha": 0.1, "kappa_low": 0.6, "kappa_high": 2.0, "penalty": penalty}
    out = REGULARIZERS.build("epo", params)(
        _inputs([1.0] * 3, [0.0] * 3, entropy=entropy), entropy_ref=1.0, beta=1.5
    )
    torch.testing.assert_close(out.per_token_loss, torch.tensor([loss], dtype=torch.float64))
    (g,) = torch.autograd.grad(out.per_token_loss.sum(), entropy)
    torch.testing.assert_close(g, torch.tensor([grad], dtype=torch.float64))
    # step 0: no reference yet -> plain entropy bonus
    out0 = REGULARIZERS.build("epo", params)(_inputs([1.0] * 3, [0.0] * 3, entropy=entropy.detach()))
    torch.testing.assert_close(out0.per_token_loss, -entropy.detach())


def test_aent_controller_band_and_state():
    ctrl = make_controller(
        "aent", REGULARIZERS.make_params("aent", {"adaptive": True, "warmup_steps": 1}), total_steps=10
    )
    assert isinstance(ctrl, AEntController)
    ctrl.update({"entropy/clamped_mean": 0.05})  # warmup: unchanged
    assert ctrl.loss_kwargs() == {"coef": 1e-3}
    ctrl.update({"entropy/clamped_mean": 0.05})  # below band [.1, .5]: c += 1e-3 * .05
    assert ctrl.coef == pytest.approx(1.05e-3)
    ctrl.update({"entropy/clamped_mean": 0.3})  # inside: unchanged
    ctrl.update({"entropy/clamped_mean": 0.6})  # above: c -= 1e-3 * .1
    assert ctrl.coef == pytest.approx(0.95e-3)
    ctrl.update({"entropy/clamped_mean": -100.0})  # clipped to coef_max
    assert ctrl.coef == pytest.approx(1e-2)
    fresh = AEntController(ctrl.params)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.state_dict() == ctrl.state_dict()
    with pytest.raises(KeyError, match="entropy/clamped_mean"):
        ctrl.update({"entropy/mean": 1.0})


def test_epo_controller_history_and_beta():
    ctrl = make_controller("epo", REGULARIZERS.make_params("epo"), total_steps=10)
    assert isinstance(ctrl, EPOController)
    assert ctrl.loss_kwargs() == {"entropy_ref": None, "beta": 2.0}  # k = 0: beta = 1 + e^0
    ctrl.update({"entropy/mean": 1.0})
    # k = 1, k_mid = 5, gamma = 3: beta = 1 + exp(-.6)
    assert ctrl.loss_kwargs() == pytest.approx({"entropy_ref": 1.0, "beta": 1 + math.exp(-0.6)})
    ctrl.update({"entropy/mean": 2.0})
    assert ctrl.entropy_ref == pytest.approx(1.5)
    fresh = EPOController(ctrl.params, 10)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.loss_kwargs() == ctrl.loss_kwargs()


def test_epo_per_turn_history_as_the_released_code():
    """history "turn": Href[s] = mean over steps so far (this one included) of the rollout's
    turn-s entropy; a step whose episodes stopped early does not count for later turns."""
    ctrl = make_controller("epo", REGULARIZERS.make_params("epo", {"history": "turn"}), total_steps=10)
    assert ctrl.entropy_ref is None
    ctrl.observe_rollout({"entropy/turn_0": 1.0, "entropy/turn_1": 2.0, "reward/mean": 0.5})
    assert ctrl.loss_kwargs() == {"entropy_ref": [1.0, 2.0], "beta": 2.0}  # no update yet: k = 0
    ctrl.update({"entropy/mean": 9.0})  # the step's learner entropy plays no part here
    ctrl.observe_rollout({"entropy/turn_0": 3.0})
    assert ctrl.entropy_ref == [2.0, 2.0] and ctrl.beta == pytest.approx(1 + math.exp(-0.6))
    fresh = EPOController(ctrl.params, 10)
    fresh.load_state_dict(ctrl.state_dict())
    assert fresh.loss_kwargs() == ctrl.loss_kwargs()


def test_epo_per_turn_reference_is_looked_up_by_each_rows_turn():
    # rows of turn 0 and 5 (past the table: its last entry); Href = [1, 4]; kappa_high 2:
    # row 0: H = 3 > 2 * 1 -> P = 1; row 1: H = 3 < 2 * 4 -> P = 0
    entropy = torch.tensor([[3.0], [3.0]], dtype=torch.float64)
    zeros = torch.zeros_like(entropy)
    inputs = LossInputs(
        zeros, zeros, zeros, torch.ones_like(entropy), entropy=entropy, turn_idx=torch.tensor([0, 5])
    )
    params = {"coef": 1.0, "alpha": 0.1, "history": "turn"}
    out = REGULARIZERS.build("epo", params)(inputs, entropy_ref=[1.0, 4.0], beta=1.0)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-3.0 + 0.1], [-3.0]], dtype=torch.float64))
    assert REGULARIZERS.build("epo", params).needs == {"entropy", "turn_idx"}
    inputs.turn_idx = None
    with pytest.raises(ValueError, match="turn_idx"):
        REGULARIZERS.build("epo", params)(inputs, entropy_ref=[1.0], beta=1.0)


def test_adaptive_kl_controller():
    assert make_controller("kl", REGULARIZERS.make_params("kl"), total_steps=1) is None  # fixed coef
    ctrl = make_controller(
        "kl", REGULARIZERS.make_params("kl", {"coef": 0.1, "target": 0.1, "horizon": 100}), total_steps=1
    )
    assert isinstance(ctrl, AdaptiveKLController)
    ctrl.update({"loss/kl_ref": 0.2, "batch/num_samples": 10})  # error clipped to .2: *= 1 + .2 * 10 / 100
    assert ctrl.coef == pytest.approx(0.102)
    assert make_controller("entropy_bonus", REGULARIZERS.make_params("entropy_bonus"), total_steps=1) is None


def _grad(out, inputs):
    return torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)[0]


def test_dual_clip_negative_advantage_gradient():
    # A = -1: r = 5 > c = 3 -> loss capped at 3, gradient 0; r = 2 < c -> -A r = 2, gradient 2
    inputs = _inputs([5.0, 2.0], [-1.0, -1.0])
    out = POLICY_LOSSES.build("ppo_clip")(inputs)
    torch.testing.assert_close(_grad(out, inputs), torch.tensor([[0.0, 2.0]], dtype=torch.float64))
    inputs = _inputs([5.0, 2.0], [-1.0, -1.0])  # without the dual clip the r = 5 token pushes with 5
    out = POLICY_LOSSES.build("ppo_clip", {"dual_clip": None})(inputs)
    torch.testing.assert_close(_grad(out, inputs), torch.tensor([[5.0, 2.0]], dtype=torch.float64))


def test_aepo_vs_ppo_gradient_at_upper_clip():
    # (r = 1.5, A = 2) above 1 + eps_h: PPO passes 0, AEPO passes (1 + eps_h) A = 2.4; same forward
    grads, values = [], []
    for name, params in [("ppo_clip", {}), ("aepo", {"entropy_adv_coef": 0.0})]:
        inputs = _inputs([1.5], [2.0])
        out = POLICY_LOSSES.build(name, params)(inputs)
        values.append(out.per_token_loss.item())
        grads.append(_grad(out, inputs).item())
    assert values == pytest.approx([-2.4, -2.4])
    assert grads == pytest.approx([0.0, -2.4])


def test_kl_cov_gradient_only_on_top_covariance_token():
    # same batch with and without the KL term: the gradients differ only at token 0 (top Cov)
    shift = (0.5, 0.3, -0.2, 0.1)
    with_kl, without = _cov_inputs(old_shift=shift), _cov_inputs(old_shift=shift)
    g_kl = _grad(POLICY_LOSSES.build("kl_cov", {"kl_ratio": 0.25})(with_kl), with_kl)
    g_plain = _grad(POLICY_LOSSES.build("kl_cov", {"kl_ratio": 0.25, "kl_coef": 0.0})(without), without)
    diff = g_kl - g_plain
    # d(beta |log r|)/dlogp = beta sign(log r) = +1 at token 0 (log r = .5)
    torch.testing.assert_close(diff, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))


def test_epo_hinge_gradient_is_nonzero_outside_the_corridor():
    # H = 3 > kappa_r Href = 2: d/dH of -lambda (H - beta alpha (H - 2)) = -lambda (1 - beta alpha)
    entropy = torch.tensor([[3.0]], dtype=torch.float64, requires_grad=True)
    params = {"coef": 1.0, "alpha": 0.5, "kappa_low": 0.0, "kappa_high": 2.0}
    out = REGULARIZERS.build("epo", params)(_inputs([1.0], [0.0], entropy=entropy), entropy_ref=1.0, beta=1.0)
    (g,) = torch.autograd.grad(out.per_token_loss.sum(), entropy)
    assert g.item() == pytest.approx(-0.5)  # the indicator version would give -1 (no penalty gradient)


# tokens: (r=2, A=+1) above 1.2; (r=.5, A=+1) inside; (r=.5, A=-1) below .8; (r=5, A=-1) dual clip;
#         (r=1.1, A=-1) inside
GPPO_RATIOS = [2.0, 0.5, 0.5, 5.0, 1.1]
GPPO_ADVS = [1.0, 1.0, -1.0, -1.0, -1.0]


def test_ce_gppo_hand_values_and_preserved_gradients():
    inputs = _inputs(GPPO_RATIOS, GPPO_ADVS)
    out = POLICY_LOSSES.build("ce_gppo")(inputs)
    # above: -beta2 (1.2) A = -1.2 | -A r = -.5 | below: -beta1 (.8) A = .75 * .8 = .6 | min(5, 3) | 1.1
    expected = torch.tensor([[-1.2, -0.5, 0.6, 3.0, 1.1]], dtype=torch.float64)
    torch.testing.assert_close(out.per_token_loss, expected)
    # gradients at clipped tokens: beta * bound * (-A), not 0 as in PPO; the dual clip still gives 0
    torch.testing.assert_close(
        _grad(out, inputs), expected * torch.tensor([[1.0, 1, 1, 0, 1]], dtype=torch.float64)
    )
    assert out.metrics["loss/clipfrac"].item() == pytest.approx(2 / 5)


def test_ce_gppo_with_beta_0_1_has_aepo_gradients():
    a, b = _inputs(GPPO_RATIOS, GPPO_ADVS), _inputs(GPPO_RATIOS, GPPO_ADVS)
    gppo = POLICY_LOSSES.build("ce_gppo", {"beta_low": 0.0, "beta_high": 1.0})(a)
    aepo = POLICY_LOSSES.build("aepo", {"entropy_adv_coef": 0.0})(b)
    torch.testing.assert_close(_grad(gppo, a), _grad(aepo, b))


def test_ce_gppo_ratio_far_outside_the_clip_range():
    # r = e^15: A > 0 -> value and gradient -beta2 (1 + eps_h) A, finite; A < 0 -> dual clip, gradient 0
    inputs = _inputs([math.exp(15.0), math.exp(15.0), math.exp(-15.0)], [1.0, -1.0, -1.0])
    out = POLICY_LOSSES.build("ce_gppo")(inputs)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[-1.2, 3.0, 0.6]], dtype=torch.float64))
    torch.testing.assert_close(_grad(out, inputs), torch.tensor([[-1.2, 0.0, 0.6]], dtype=torch.float64))


# BAPO: (r, A) = (1, +1) (1.3, +1) (.62, -1) (1, -1) (.72, -1); grids lows .6..., highs 1.2, 1.3, 1.4
BAPO_RATIOS = [1.0, 1.3, 0.62, 1.0, 0.72]
BAPO_ADVS = [1.0, 1.0, -1.0, -1.0, -1.0]
BAPO_GRID = {"high_max": 1.4, "high_step": 0.1}


def test_bapo_grid_and_search():
    assert bapo_grid(0.6, 0.8, 0.05) == pytest.approx([0.6, 0.65, 0.7, 0.75, 0.8])
    assert bapo_grid(1.2, 2.0, 0.3) == pytest.approx([1.2, 1.5, 1.8, 2.0])  # last clamped to the max
    params = POLICY_LOSSES.make_params("bapo", BAPO_GRID)
    inputs = _inputs(BAPO_RATIOS, BAPO_ADVS)
    ratio = inputs.logprobs.detach().exp()
    neg, pos = bapo_contributions(ratio, inputs.advantages, inputs.loss_mask, params)
    # unclipped: N(c_l) = sum r|A| over A<0 with r >= c_l; P(c_h) = sum r A over A>0 with r <= c_h
    torch.testing.assert_close(neg, torch.tensor([2.34, 1.72, 1.72, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(pos, torch.tensor([1.0, 2.3, 2.3], dtype=torch.float64))
    # P/N: 1/2.34, 1/1.72, 1/1.72, then 1/1 >= 1 at c_low = .75; c_high stays 1.2
    assert bapo_search(neg, pos, params) == pytest.approx((0.75, 1.2))
    # target 1.5: c_low runs to its max (1/1), then c_high 1.3 gives 2.3/1 >= 1.5
    strict = POLICY_LOSSES.make_params("bapo", {**BAPO_GRID, "target": 1.5})
    assert bapo_search(neg, pos, strict) == pytest.approx((0.8, 1.3))
    # no negative tokens: balanced at the start bounds
    assert bapo_search(torch.zeros(5), pos, strict) == pytest.approx((0.6, 1.2))
    # released-code "clamped" sums: raising c_low *raises* N, so the search runs to both maxima
    clamped = POLICY_LOSSES.make_params("bapo", {**BAPO_GRID, "contribution": "clamped"})
    neg_c, pos_c = bapo_contributions(ratio, inputs.advantages, inputs.loss_mask, clamped)
    torch.testing.assert_close(neg_c[[0, 4]], torch.tensor([2.34, 2.6], dtype=torch.float64))
    assert bapo_search(neg_c, pos_c, clamped) == pytest.approx((0.8, 1.4))


def test_bapo_loss_uses_searched_bounds():
    inputs = _inputs(BAPO_RATIOS, BAPO_ADVS)
    out = POLICY_LOSSES.build("bapo", BAPO_GRID)(inputs)
    # bounds (.75, 1.2): -1 | 1.3 -> -1.2 (clipped) | .62 -> .75 (clipped) | 1 | .72 -> .75 (clipped)
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.0, -1.2, 0.75, 1.0, 0.75]], dtype=torch.float64)
    )
    torch.testing.assert_close(_grad(out, inputs), torch.tensor([[-1.0, 0, 0, 1.0, 0]], dtype=torch.float64))
    assert out.metrics["loss/bapo_c_low"].item() == pytest.approx(0.75)
    assert "bapo/neg_sum/0" not in out.metrics  # grid sums only with scope="step"
    # explicit bounds from the controller win; a ratio far outside them hits the dual clip (3)
    inputs = _inputs([100.0, 1.3], [-1.0, 1.0])
    out = POLICY_LOSSES.build("bapo", {"scope": "step"})(inputs, clip_bounds=(0.8, 1.4))
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[3.0, -1.3]], dtype=torch.float64))
    torch.testing.assert_close(_grad(out, inputs), torch.tensor([[0.0, -1.3]], dtype=torch.float64))
    assert "bapo/pos_sum/16" in out.metrics  # default high grid 1.2..2.0 step .05: 17 points
    with pytest.raises(ValueError, match="low_start <= low_max"):
        POLICY_LOSSES.build("bapo", {"low_start": 0.9})


def test_hapo_entropy_signal():
    # log H = [-2, -1, 0, 1, 2]; pivot .5 -> median 0: h = d / 2; pivot .8 -> q = 1.2:
    # d = [-3.2, -2.2, -1.2, -.2, .8] -> negatives / 3.2, positives / .8
    entropy = torch.tensor([[math.exp(k) for k in (-2, -1, 0, 1, 2)]], dtype=torch.float64)
    mask = torch.ones_like(entropy)
    torch.testing.assert_close(
        hapo_entropy_signal(entropy, mask, 0.5), torch.tensor([[-1, -0.5, 0, 0.5, 1]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        hapo_entropy_signal(entropy, mask),
        torch.tensor([[-1, -0.6875, -0.375, -0.0625, 1]], dtype=torch.float64),
    )
    assert (hapo_entropy_signal(torch.ones(2, 3), torch.ones(2, 3)) == 0).all()  # all equal -> 0


def test_hapo_loss_hand_values():
    # h = [-1, -.5, 0, .5, 1] (pivot .5); eps .2, alpha = beta = 1
    entropy = torch.tensor([[math.exp(k) for k in (-2, -1, 0, 1, 2)]], dtype=torch.float64)
    inputs = _inputs([0.7, 1.0, 1.0, 1.25, 1.5], [-1.0, 1.0, 2.0, 1.0, 1.0], entropy=entropy)
    out = POLICY_LOSSES.build("hapo", {"entropy_pivot": 0.5})(inputs)
    # t0 h=-1: eps_l' = .4 -> r = .7 not clipped (PPO would clip at .8); outside band (.8, 1.1): A' = A -> .7
    # t1 h=-.5: inside band (.85, 1.1): A' = 1 * .5 -> -.5
    # t2 h=0: inside (.9, 1.1): A' = 2 (1 + 0) -> -2
    # t3 h=.5: eps_h' = .3, band (.9, 1.15), r = 1.25 outside: A' = 1.5 -> -1.875 (not clipped, < 1.3)
    # t4 h=1: eps_h' = .4, r = 1.5 outside: A' = 2 -> clipped at 1.4: -2.8, gradient 0
    expected = torch.tensor([[0.7, -0.5, -2.0, -1.875, -2.8]], dtype=torch.float64)
    torch.testing.assert_close(out.per_token_loss, expected)
    torch.testing.assert_close(
        _grad(out, inputs), expected * torch.tensor([[1.0, 1, 1, 1, 0]], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="entropy"):
        POLICY_LOSSES.build("hapo")(_inputs([1.0], [1.0]))


def _steer_inputs(advantages=(2.0, -1.0, 0.5, 0.0)):
    # pi = pi_old = .5, H = ln 2 + 1 -> log pi + H = 1, Omega = (A / .5) * .25 * 1 = A / 2
    n = len(advantages)
    logprobs = torch.full((1, n), math.log(0.5), dtype=torch.float64, requires_grad=True)
    return LossInputs(
        logprobs,
        logprobs.detach().clone(),
        torch.tensor([advantages], dtype=torch.float64),
        torch.ones(1, n, dtype=torch.float64),
        entropy=torch.full((1, n), math.log(2) + 1, dtype=torch.float64),
    )


def test_steer_token_weights():
    # |Omega| = [1, .5, .25, 0]; exponential: kappa = -ln .8 / 1 -> w = .8^|Omega|
    out = TOKEN_WEIGHTS.build("steer")(_steer_inputs())
    expected = torch.tensor([[0.8, 0.8**0.5, 0.8**0.25, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out.token_weights, expected)
    # linear: w = 1 - (|Omega| - 0) / (1 - 0) * .2
    linear = TOKEN_WEIGHTS.build("steer", {"mode": "linear"})(_steer_inputs())
    torch.testing.assert_close(
        linear.token_weights, torch.tensor([[0.8, 0.9, 0.95, 1.0]], dtype=torch.float64)
    )
    # all |Omega| equal (A = 0): linear gives w_max, exponential exp(0) = 1
    flat = _steer_inputs((0.0, 0.0))
    assert (TOKEN_WEIGHTS.build("steer", {"mode": "linear"})(flat).token_weights == 1).all()
    assert (TOKEN_WEIGHTS.build("steer")(flat).token_weights == 1).all()


def test_steer_weights_any_loss_and_compose():
    inputs = _steer_inputs()
    weights = TOKEN_WEIGHTS.build("steer", {"mode": "linear"})(inputs).token_weights
    weighted = with_token_weights(inputs, weights)
    # r = 1: ppo loss -A = [-2, 1, -.5, 0], times w
    out = POLICY_LOSSES.build("ppo_clip")(weighted)
    torch.testing.assert_close(
        out.per_token_loss, torch.tensor([[-1.6, 0.9, -0.475, 0.0]], dtype=torch.float64)
    )
    twice = with_token_weights(weighted, weights)
    torch.testing.assert_close(twice.token_weights, weights**2)
    assert inputs.token_weights is None  # with_token_weights copies


def test_top_p_entropy_from_logits():
    # p = [.5, .3, .2], top_p .75: mass before each = [0, .5, .8] -> keep .5, .3 -> renormalise [.625, .375]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    expected = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))
    assert top_p_entropy_from_logits(logits, 0.75).item() == pytest.approx(expected)
    assert top_p_entropy_from_logits(logits, 1.0).item() == pytest.approx(
        -sum(p * math.log(p) for p in (0.5, 0.3, 0.2))
    )
    assert top_p_entropy_from_logits(logits, 0.75, top_k=1).item() == pytest.approx(0.0)  # one token left


def _siren_inputs():
    # row 0: H = [1, 2, 3, 4] -> 80th pct 3.4 -> peak {4}; row 1: H = [2, 2, x] (x masked) -> both;
    # row 2 fully masked. H_sel = mean(4, 2) = 3
    top_p = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 9.0, 0.0], [5.0] * 4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    logprobs = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    return LossInputs(
        logprobs, logprobs.detach(), torch.zeros_like(mask), mask, top_p_entropy=top_p.requires_grad_(True)
    )


def test_siren_value_and_gradient_under_seq_mean_token_mean():
    from trainer.aggregation import aggregate

    inputs = _siren_inputs()
    siren = REGULARIZERS.build("siren", {"coef": 0.5})
    assert siren.needs == {"top_p_entropy"} and siren.flags["aggregation"] == "seq-mean-token-mean"
    out = siren(inputs, entropy_anchor=1.0)
    assert out.metrics["entropy/siren_selected"].item() == pytest.approx(3.0)
    loss = aggregate(out.per_token_loss, inputs.loss_mask, "seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5 * (3.0 - 1.0) ** 2)  # beta (H_sel - anchor)^2
    (g,) = torch.autograd.grad(loss, inputs.top_p_entropy)
    # dH_sel/dH: row 0 peak token 1/2 (2 rows, 1 peak); row 1 each 1/4 -> times 2 beta d = 2
    torch.testing.assert_close(
        g, torch.tensor([[0, 0, 0, 1.0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    )
    unanchored = siren(_siren_inputs())  # before the controller has an anchor: no loss
    assert (unanchored.per_token_loss == 0).all()
    assert REGULARIZERS.build("siren", {"entropy_key": "entropy"}).needs == {"entropy"}


def test_temperature_reinforce_term():
    # reinforce rows get -alpha A log pi; the others nothing. log pi = log .5, A = +1 on row 0
    logprobs = torch.full((2, 2), math.log(0.5), dtype=torch.float64, requires_grad=True)
    inputs = LossInputs(
        logprobs,
        logprobs.detach(),
        torch.tensor([[1.0, 1.0], [0.7, 0.7]], dtype=torch.float64),
        torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64),
        reinforce_mask=torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64),
    )
    out = REGULARIZERS.build("temperature_reinforce", {"coef": 0.5})(inputs)
    l2 = math.log(2)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([[0.5 * l2, 0], [0, 0]], dtype=torch.float64))
    torch.testing.assert_close(_grad(out, inputs), torch.tensor([[-0.5, 0], [0, 0]], dtype=torch.float64))
