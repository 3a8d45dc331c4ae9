"""Policy losses against hand-computed values; masking invariance. Run: pytest tests/trainer/test_losses.py"""

import math

import pytest
import torch

from trainer.controllers import AdaptiveKLController, AEntController, EPOController, make_controller
from trainer.losses import POLICY_LOSSES, REGULARIZERS, LossInputs, forking_token_mask, kl_estimate

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


def _random_inputs(seed, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    loss_mask = (torch.rand(B, T, generator=g) > 0.3).double()
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logprobs.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64) * loss_mask
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64).requires_grad_(True)
    return LossInputs(
        logprobs,
        old,
        advantages,
        loss_mask,
        entropy=entropy,
        ref_logprobs=old - 0.1,
        rollout_logprobs=old.clone(),
        traj_ids=torch.tensor([0, 0, 1]),
        clamped_entropy=(entropy.detach() / 2).requires_grad_(True),
    )


def _perturb_masked(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    masked = inputs.loss_mask == 0
    noise = lambda: 50 * torch.randn(inputs.logprobs.shape, generator=g, dtype=torch.float64)  # noqa: E731
    logprobs = torch.where(masked, noise(), inputs.logprobs.detach()).requires_grad_(True)
    entropy = torch.where(masked, noise().abs(), inputs.entropy.detach()).requires_grad_(True)
    return LossInputs(
        logprobs,
        torch.where(masked, noise(), inputs.old_logprobs),
        torch.where(masked, noise(), inputs.advantages),
        inputs.loss_mask,
        entropy=entropy,
        ref_logprobs=torch.where(masked, noise(), inputs.ref_logprobs),
        rollout_logprobs=torch.where(masked, noise(), inputs.rollout_logprobs),
        traj_ids=inputs.traj_ids,
        clamped_entropy=torch.where(masked, noise(), inputs.clamped_entropy.detach()).requires_grad_(True),
    )


def _loss_and_grads(fn, inputs):
    out = fn(inputs)
    grads = torch.autograd.grad(
        out.per_token_loss.sum(), [inputs.logprobs, inputs.entropy, inputs.clamped_entropy], allow_unused=True
    )
    return out, [torch.zeros_like(inputs.logprobs) if g is None else g for g in grads]


@pytest.mark.parametrize(
    "registry, name",
    [(POLICY_LOSSES, n) for n in POLICY_LOSSES.names()] + [(REGULARIZERS, n) for n in REGULARIZERS.names()],
)
def test_masking_invariance(registry, name):
    """Every registered term through the shared signature: changing anything at loss_mask == 0
    changes neither the per-token loss nor the grads."""
    fn = registry.build(name)
    base = _random_inputs(0)
    torch.manual_seed(0)
    out_a, grads_a = _loss_and_grads(fn, base)
    torch.manual_seed(0)
    out_b, grads_b = _loss_and_grads(fn, _perturb_masked(base, 1))
    torch.testing.assert_close(out_a.per_token_loss, out_b.per_token_loss)
    assert (out_a.per_token_loss[base.loss_mask == 0] == 0).all()
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb)
        assert (ga[base.loss_mask == 0] == 0).all()
    for key in out_a.metrics:
        torch.testing.assert_close(out_a.metrics[key], out_b.metrics[key])


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


def test_adaptive_kl_controller():
    assert make_controller("kl", REGULARIZERS.make_params("kl"), total_steps=1) is None  # fixed coef
    ctrl = make_controller(
        "kl", REGULARIZERS.make_params("kl", {"coef": 0.1, "target": 0.1, "horizon": 100}), total_steps=1
    )
    assert isinstance(ctrl, AdaptiveKLController)
    ctrl.update({"loss/kl_ref": 0.2, "batch/num_samples": 10})  # error clipped to .2: *= 1 + .2 * 10 / 100
    assert ctrl.coef == pytest.approx(0.102)
    assert make_controller("entropy_bonus", REGULARIZERS.make_params("entropy_bonus"), total_steps=1) is None
