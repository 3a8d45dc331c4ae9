"""Every registered entry of every registry through its shared signature on one tiny batch (all
optional inputs given): shapes, zeros at masked tokens, finite values; error messages list the
valid names/keys; masking invariance of every policy loss, regulariser and token weighting.
Run: pytest tests/trainer/test_signatures.py"""

import dataclasses

import pytest
import torch

from trainer.advantages import ADVANTAGES, AdvantageInputs
from trainer.aggregation import AGGREGATIONS
from trainer.controllers import make_controller
from trainer.losses import POLICY_LOSSES, TOKEN_WEIGHTS, LossInputs
from trainer.regularizers import REGULARIZERS

B, T = 4, 5
GRAD_FIELDS = ("logprobs", "entropy", "clamped_entropy", "top_p_entropy")


def _loss_mask():
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    mask[3] = 0  # a fully masked row
    return mask


def _loss_inputs(seed=0, log_ratio_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = _loss_mask()
    rand = lambda: torch.rand(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    logprobs = (-rand() - 0.05).requires_grad_(True)
    old = logprobs.detach() + log_ratio_scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    entropy = (rand() + 0.1).requires_grad_(True)
    return LossInputs(
        logprobs,
        old,
        torch.randn(B, T, generator=g, dtype=torch.float64) * mask,
        mask,
        rollout_logprobs=old.clone(),
        ref_logprobs=old - 0.1,
        entropy=entropy,
        clamped_entropy=(entropy.detach() / 2).requires_grad_(True),
        token_weights=0.5 + rand(),
        traj_ids=torch.tensor([0, 0, 1, 2]),
        top_p_entropy=(entropy.detach() * 0.8).requires_grad_(True),
        reinforce_mask=torch.tensor([[1.0] * T, [0.0] * T, [1.0] * T, [0.0] * T], dtype=torch.float64),
    )


def _adv_inputs(noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = _loss_mask().float()
    junk = lambda: noise * torch.randn(B, T, generator=g)  # noqa: E731
    where = lambda x: torch.where(mask > 0, x, junk())  # noqa: E731
    base = torch.arange(B * T, dtype=torch.float32).view(B, T) / 10
    return AdvantageInputs(
        rewards=torch.tensor([1.0, 0.0, 2.0, 1.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        traj_ids=torch.tensor([0, 1, 2, 3]),
        loss_mask=mask,
        values=where(base),
        token_rewards=where(base.flip(1)),
        entropies=where(base + 0.1).abs(),
        turn_idx=torch.tensor([0, 0, 0, 0]),
        step_rewards=torch.tensor([0.0, 1.0, 2.0, 1.0]),
        anchor_keys=["x", "y", "x", "x"],
        parent_ids=torch.tensor([-1, 0, -1, 2]),
        fork_positions=torch.tensor([0, 2, 0, 1]),
    )


def _check_matrix(matrix, mask, what):
    assert matrix.shape == (B, T), what
    assert torch.isfinite(matrix).all(), what
    assert (matrix[mask == 0] == 0).all(), what


def _check_metrics(metrics, what):
    for key, value in metrics.items():
        assert "/" in key, f"{what}: metric {key!r} is not namespaced"
        value = torch.as_tensor(value)
        assert value.dim() == 0 and torch.isfinite(value), f"{what}: {key}"
        assert not value.requires_grad, f"{what}: {key}"


def _controller_kwargs(name, params, metrics):
    ctrl = make_controller(name, params, total_steps=10)
    if ctrl is None:
        return {}
    ctrl.update(
        {"entropy/mean": 1.0, **{k: float(v) + 0.5 for k, v in metrics.items()}}
    )  # off the batch value
    return ctrl.loss_kwargs()


@pytest.mark.parametrize("log_ratio_scale", [0.3, 40.0], ids=["near", "far_outside_clip"])
@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_policy_loss(name, log_ratio_scale):
    inputs = _loss_inputs(log_ratio_scale=log_ratio_scale)
    torch.manual_seed(0)
    out = POLICY_LOSSES.build(name)(inputs)
    _check_matrix(out.per_token_loss, inputs.loss_mask, name)
    _check_metrics(out.metrics, name)
    grads = torch.autograd.grad(out.per_token_loss.sum(), inputs.logprobs)
    _check_matrix(grads[0], inputs.loss_mask, name)


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_with_and_without_controller(name):
    fn = REGULARIZERS.build(name)
    first = fn(_loss_inputs())
    for out in (first, fn(_loss_inputs(), **_controller_kwargs(name, fn.params, first.metrics))):
        _check_matrix(out.per_token_loss, _loss_mask(), name)
        _check_metrics(out.metrics, name)


@pytest.mark.parametrize("name", TOKEN_WEIGHTS.names())
def test_every_token_weighting(name):
    inputs = _loss_inputs()
    out = TOKEN_WEIGHTS.build(name)(inputs)
    _check_matrix(out.token_weights, inputs.loss_mask, name)
    assert not out.token_weights.requires_grad
    assert ((out.token_weights >= 0) & (out.token_weights <= 1)).all()
    _check_metrics(out.metrics, name)


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_advantage_estimator(name):
    inputs = _adv_inputs()
    if name == "grpo_tree":  # these fork positions describe whole-episode rows (trajectory mode);
        inputs = dataclasses.replace(inputs, turn_idx=None)  # step-mode trees: test_credit.py
    out = ADVANTAGES.build(name)(inputs)
    _check_matrix(out.advantages, inputs.loss_mask, name)
    for extra in (out.returns, out.loss_mask):
        if extra is not None:
            _check_matrix(extra, inputs.loss_mask, name)
    for key, value in out.metrics.items():
        assert key.startswith("adv/") and isinstance(value, float), (name, key)


@pytest.mark.parametrize("name", AGGREGATIONS.names())
def test_every_aggregation(name):
    fields = {f.name for f in dataclasses.fields(AGGREGATIONS.get(name).params)}
    fn = AGGREGATIONS.build(name, {"loss_scale_factor": float(T)} if "loss_scale_factor" in fields else None)
    value = fn(torch.ones(B, T), _loss_mask())
    assert value.dim() == 0 and torch.isfinite(value)


REGISTRIES = [ADVANTAGES, POLICY_LOSSES, REGULARIZERS, TOKEN_WEIGHTS, AGGREGATIONS]


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_unknown_names_and_keys_list_the_valid_ones(registry):
    with pytest.raises(KeyError) as err:
        registry.build("no_such_variant")
    assert ", ".join(registry.names()) in str(err.value)
    for name in registry.names():
        fields = [f.name for f in dataclasses.fields(registry.get(name).params)]
        with pytest.raises(KeyError) as err:
            registry.build(name, {"no_such_key": 1})
        expected = ", ".join(fields) if fields else "takes no params"
        assert expected in str(err.value), name


def _perturb_masked(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    masked = inputs.loss_mask == 0
    noise = lambda: 50 * torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    changed = {}
    for f in dataclasses.fields(inputs):
        value = getattr(inputs, f.name)
        if f.name in ("loss_mask", "traj_ids") or value is None:
            continue
        junk = noise().abs() if f.name in ("entropy", "clamped_entropy", "top_p_entropy") else noise()
        new = torch.where(masked, junk, value.detach())
        changed[f.name] = new.requires_grad_(True) if f.name in GRAD_FIELDS else new
    return dataclasses.replace(inputs, **changed)


def _outputs(call, inputs):
    torch.manual_seed(0)  # clip_cov samples tokens
    out = call(inputs)
    matrix = out.token_weights if hasattr(out, "token_weights") else out.per_token_loss
    leaves = [getattr(inputs, f) for f in GRAD_FIELDS]
    if matrix.requires_grad:
        grads = torch.autograd.grad(matrix.sum(), leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    return matrix, out.metrics, [torch.zeros(B, T, dtype=torch.float64) if g is None else g for g in grads]


TERMS = (
    [(POLICY_LOSSES, n) for n in POLICY_LOSSES.names()]
    + [(REGULARIZERS, n) for n in REGULARIZERS.names()]
    + [(TOKEN_WEIGHTS, n) for n in TOKEN_WEIGHTS.names()]
)


@pytest.mark.parametrize("registry, name", TERMS, ids=[f"{r.kind}:{n}" for r, n in TERMS])
def test_masking_invariance(registry, name):
    """Changing anything at loss_mask == 0 changes neither the per-token output, nor the grads,
    nor the metrics; regularisers are also checked with their controller's kwargs."""
    fn = registry.build(name)
    base = _loss_inputs()
    kwargs = {}
    if registry is REGULARIZERS:
        kwargs = _controller_kwargs(name, fn.params, fn(_loss_inputs()).metrics)
    matrix_a, metrics_a, grads_a = _outputs(lambda x: fn(x, **kwargs), base)
    matrix_b, metrics_b, grads_b = _outputs(lambda x: fn(x, **kwargs), _perturb_masked(base, 1))
    torch.testing.assert_close(matrix_a, matrix_b)
    assert (matrix_a[base.loss_mask == 0] == 0).all()
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb)
        assert (ga[base.loss_mask == 0] == 0).all()
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        torch.testing.assert_close(metrics_a[key], metrics_b[key])
