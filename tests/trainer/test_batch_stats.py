"""Batch statistics with a scope (issue #3): each loss/hook with a batch
statistic has a companion computing it from the flat valid tokens of a whole mini-batch; passed as
`batch_stats=`, the per-token losses no longer depend on the cut into micro-batches.
Run: pytest tests/trainer/test_batch_stats.py"""

import inspect
import math

import pytest
import torch

from trainer.losses import (
    POLICY_LOSSES,
    TOKEN_WEIGHTS,
    LossInputs,
    TokenBatch,
    batch_stats_fn,
    hapo_batch_stats,
    token_batch,
    with_token_weights,
)

# (registry, name, params); clip_ratio = 1 drops every candidate, so Clip-Cov is deterministic.
CASES = [
    (
        POLICY_LOSSES,
        "clip_cov",
        {"clip_ratio": 1.0, "cov_lb": 0.0, "cov_ub": 4.0, "clip_low": 0.2, "clip_high": 0.2},
    ),
    (POLICY_LOSSES, "kl_cov", {"kl_ratio": 0.25}),
    (POLICY_LOSSES, "aepo", {}),
    (POLICY_LOSSES, "hapo", {"entropy_pivot": 0.7}),
    (TOKEN_WEIGHTS, "steer", {}),
    (TOKEN_WEIGHTS, "steer", {"mode": "linear"}),
]
RANDOM_CLIP_COV = (POLICY_LOSSES, "clip_cov", {"clip_ratio": 0.1, "cov_lb": 0.0, "cov_ub": 4.0})
IDS = [f"{name}-{params.get('mode', '')}" for _, name, params in CASES]


def _batch(seed: int, rows: int = 4, cols: int = 6, dtype=torch.float64) -> LossInputs:
    """Random inputs on a grid of multiples of 1/16: every sum is exact, whatever its order, so the
    mean of the masked [B, T] matrix and of the flat valid tokens agree to the bit."""
    gen = torch.Generator().manual_seed(seed)

    def ints(low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (rows, cols), generator=gen).to(dtype)

    logprobs = (-ints(0, 24) / 8).requires_grad_()
    mask = (torch.rand(rows, cols, generator=gen) > 0.2).to(dtype)
    mask[:, 0] = 1
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs.detach() + ints(-2, 3) / 8,  # ratios exp(+-k/8): some clipped at 0.2
        advantages=ints(-8, 9) / 4 * mask,
        loss_mask=mask,
        entropy=ints(1, 33) / 16,
    )


def _rows(inputs: LossInputs, rows: slice) -> LossInputs:
    """A micro-batch: these rows of every [B, T] field (slices of the same leaf logprobs)."""
    fields = ("logprobs", "old_logprobs", "advantages", "loss_mask", "entropy")
    return LossInputs(**{f: getattr(inputs, f)[rows] for f in fields})


def _run(registry, built, inputs: LossInputs, **kwargs) -> torch.Tensor:
    """The [B, T] output that carries the statistic: per-token loss, or STEER's weights."""
    out = built(inputs, **kwargs)
    return out.per_token_loss if registry is POLICY_LOSSES else out.token_weights


def _loss_of(registry, output: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    """Something to differentiate: the loss itself, or PPO weighted by STEER's weights."""
    if registry is POLICY_LOSSES:
        return output
    return POLICY_LOSSES.build("ppo_clip")(with_token_weights(inputs, output)).per_token_loss


def _grad(loss: torch.Tensor, inputs: LossInputs) -> torch.Tensor:
    return torch.autograd.grad(loss.sum(), inputs.logprobs)[0]


def _split_run(registry, built, inputs: LossInputs, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """Two micro-batches (rows 0-1, 2-3), each called with `stats`: (joined output, gradient)."""
    halves = [_rows(inputs, slice(0, 2)), _rows(inputs, slice(2, 4))]
    outputs = [_run(registry, built, half, batch_stats=stats) for half in halves]
    loss = torch.cat([_loss_of(registry, o, h) for o, h in zip(outputs, halves, strict=True)])
    return torch.cat(outputs), _grad(loss, inputs)


# --------------------------------------------------------------------------------------------
# Registry wiring


def test_every_entry_with_a_batch_stats_keyword_has_a_companion_and_vice_versa():
    for registry in (POLICY_LOSSES, TOKEN_WEIGHTS):
        for name in registry.names():
            entry = registry.get(name)
            takes = "batch_stats" in inspect.signature(entry.fn).parameters
            assert takes == ("batch_stats" in entry.flags), name


def test_batch_stats_fn_binds_params_and_declares_needs():
    assert batch_stats_fn(POLICY_LOSSES.build("ppo_clip")) is None
    assert batch_stats_fn(POLICY_LOSSES.build("bapo")) is None  # BAPO keeps its own `scope`
    assert batch_stats_fn(POLICY_LOSSES.build("aepo", {"entropy_adv_coef": 0.0})) is None  # no z-score
    for registry, name, needs in [
        (POLICY_LOSSES, "clip_cov", set()),
        (POLICY_LOSSES, "kl_cov", set()),
        (POLICY_LOSSES, "aepo", {"entropy"}),
        (POLICY_LOSSES, "hapo", {"entropy"}),
        (TOKEN_WEIGHTS, "steer", {"entropy"}),
    ]:
        built = registry.build(name)
        fn = batch_stats_fn(built)
        assert fn.needs == needs, name
        assert fn.needs <= built.needs  # the pre-pass never needs more than the loss itself
        assert fn.keywords["params"] is built.params


def test_token_batch_flattens_valid_tokens_row_by_row():
    inputs = _batch(0)
    tokens = token_batch(inputs)
    valid = inputs.loss_mask > 0
    assert tokens.num_tokens == int(valid.sum())
    torch.testing.assert_close(tokens.logprobs, inputs.logprobs.detach()[valid])
    assert not tokens.logprobs.requires_grad
    torch.testing.assert_close(tokens.entropy, inputs.entropy[valid])
    joined = TokenBatch.cat(
        [token_batch(_rows(inputs, slice(0, 2))), token_batch(_rows(inputs, slice(2, 4)))]
    )
    for field in ("logprobs", "old_logprobs", "advantages", "entropy"):
        assert torch.equal(getattr(joined, field), getattr(tokens, field))
    no_entropy = TokenBatch(tokens.logprobs, tokens.old_logprobs, tokens.advantages)
    assert TokenBatch.cat([tokens, no_entropy]).entropy is None
    with pytest.raises(ValueError, match="TokenBatch.advantages"):
        TokenBatch(tokens.logprobs, tokens.old_logprobs, tokens.advantages[:-1])
    with pytest.raises(ValueError, match="entropy"):
        batch_stats_fn(POLICY_LOSSES.build("hapo"))(no_entropy)


def test_wrong_stats_dict_is_a_clear_error():
    inputs = _batch(0)
    kl_stats = batch_stats_fn(POLICY_LOSSES.build("kl_cov"))(token_batch(inputs))
    with pytest.raises(KeyError, match="entropy_mean"):
        POLICY_LOSSES.build("aepo")(inputs, batch_stats=kl_stats)


# --------------------------------------------------------------------------------------------
# (a) one micro-batch: the companion's statistics reproduce the micro-batch path exactly


@pytest.mark.parametrize(
    ("registry", "name", "params"), [*CASES, RANDOM_CLIP_COV], ids=[*IDS, "clip_cov-random"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_micro_batch_global_stats_equal_local(registry, name, params, seed):
    inputs = _batch(seed)
    built = registry.build(name, params)
    stats = batch_stats_fn(built)(token_batch(inputs))
    torch.manual_seed(seed)  # Clip-Cov: one micro-batch holds every candidate, so the same draw
    local = _run(registry, built, inputs)
    torch.manual_seed(seed)
    scoped = _run(registry, built, inputs, batch_stats=stats)
    assert torch.equal(local, scoped)
    assert torch.equal(
        _grad(_loss_of(registry, local, inputs), inputs), _grad(_loss_of(registry, scoped, inputs), inputs)
    )


@pytest.mark.parametrize(("registry", "name", "params"), CASES, ids=IDS)
def test_one_micro_batch_equal_on_continuous_values(registry, name, params):
    """Off the exact grid the two means are summed in different orders: equal up to rounding."""
    gen = torch.Generator().manual_seed(3)
    logprobs = (-torch.rand(3, 7, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    mask = (torch.rand(3, 7, generator=gen) > 0.2).double()
    inputs = LossInputs(
        logprobs=logprobs,
        old_logprobs=logprobs.detach() + 0.2 * torch.randn(3, 7, generator=gen, dtype=torch.float64),
        advantages=torch.randn(3, 7, generator=gen, dtype=torch.float64) * mask,
        loss_mask=mask,
        entropy=torch.rand(3, 7, generator=gen, dtype=torch.float64) * 2,
    )
    built = registry.build(name, params)
    stats = batch_stats_fn(built)(token_batch(inputs))
    torch.testing.assert_close(
        _run(registry, built, inputs, batch_stats=stats), _run(registry, built, inputs)
    )


# --------------------------------------------------------------------------------------------
# (b) scope invariance: micro-batches with the global statistics == the whole batch in one call


@pytest.mark.parametrize(("registry", "name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_with_global_stats_equals_whole_batch(registry, name, params, seed):
    inputs = _batch(seed)
    built = registry.build(name, params)
    whole = _run(registry, built, inputs)
    whole_grad = _grad(_loss_of(registry, whole, inputs), inputs)
    halves = [token_batch(_rows(inputs, slice(0, 2))), token_batch(_rows(inputs, slice(2, 4)))]
    stats = batch_stats_fn(built)(TokenBatch.cat(halves))  # what the learner's pre-pass gathers
    split, split_grad = _split_run(registry, built, inputs, stats)
    assert torch.equal(split, whole)
    assert torch.equal(split_grad, whole_grad)


@pytest.mark.parametrize(("registry", "name", "params"), CASES, ids=IDS)
def test_split_with_micro_batch_stats_differs(registry, name, params):
    """Without the global statistics each half normalises by its own tokens: the property above
    fails, which is what the scope exists for (and shows that test can fail)."""
    inputs = _batch(0)
    built = registry.build(name, params)
    halves = [_rows(inputs, slice(0, 2)), _rows(inputs, slice(2, 4))]
    split = torch.cat([_run(registry, built, half) for half in halves])
    assert not torch.equal(split, _run(registry, built, inputs))


def test_clip_cov_split_drops_each_candidate_with_the_global_probability():
    """p < 1 and candidates in both halves: each call flips a coin per candidate with p = n / M, so
    every candidate is dropped with the probability of the exact global draw (expected loss and
    gradient equal). Micro-batch scope drops max(1, ...) per call: 2 tokens where n = 1."""
    inputs = _batch(1)
    inputs.advantages[inputs.advantages == 0] = 0.25  # nonzero surrogates: a drop shows as a 0 loss
    inputs.advantages.mul_(inputs.loss_mask)
    built = POLICY_LOSSES.build("clip_cov", {"clip_ratio": 0.05, "cov_lb": 0.0, "cov_ub": 4.0})
    stats = batch_stats_fn(built)(token_batch(inputs))
    count, num_drop = int(stats["num_candidates"]), int(stats["num_drop"])
    assert num_drop == 1 < count  # N < 40 valid tokens: n = max(1, floor(0.05 N)) = 1
    assert stats["drop_prob"].item() == pytest.approx(1 / count)
    halves = [_rows(inputs, slice(0, 2)), _rows(inputs, slice(2, 4))]
    valid = inputs.loss_mask > 0

    def dropped(**kwargs) -> torch.Tensor:
        return torch.cat([built(h, **kwargs).per_token_loss for h in halves]).eq(0) & valid

    trials = 1000
    counts = torch.zeros_like(inputs.loss_mask)
    for trial in range(trials):
        torch.manual_seed(trial)
        counts += dropped(batch_stats=stats)
    frequency = counts / trials
    candidates = frequency > 0
    assert int(candidates.sum()) == count  # only candidates are ever dropped, and all of them can be
    assert candidates[:2].any() and candidates[2:].any()  # both halves hold some: the coin path
    assert (frequency[candidates] - 1 / count).abs().max() < 0.05  # ~5 sd of 1000 coin flips
    assert counts.sum() / trials == pytest.approx(1, abs=0.15)  # mean count n = 1
    torch.manual_seed(0)
    assert int(dropped().sum()) == 2


def test_clip_cov_draws_exactly_when_one_micro_batch_holds_every_candidate():
    inputs = _batch(1)
    # rows 2-3: A = +-1 with log r = +-0.5, so PPO clips them all (r 1.65 > 1.2 or 0.61 < 0.8)
    # and they are no candidates; they still count in N
    sign = torch.where(torch.arange(inputs.loss_mask[2:].numel()).view(2, -1) % 2 == 0, 1.0, -1.0).double()
    inputs.advantages[2:] = sign * inputs.loss_mask[2:]
    inputs.old_logprobs[2:] = inputs.logprobs[2:].detach() - 0.5 * sign
    params = {"clip_ratio": 0.05, "cov_lb": 0.0, "cov_ub": 4.0, "clip_low": 0.2, "clip_high": 0.2}
    built = POLICY_LOSSES.build("clip_cov", params)
    stats = batch_stats_fn(built)(token_batch(inputs))
    expected = min(int(stats["num_drop"]), int(stats["num_candidates"]))
    assert 0 < expected < int(stats["num_candidates"])
    for seed in range(20):
        torch.manual_seed(seed)
        first = built(_rows(inputs, slice(0, 2)), batch_stats=stats)
        second = built(_rows(inputs, slice(2, 4)), batch_stats=stats)
        assert first.metrics["loss/cov_dropped_frac"] * inputs.loss_mask[:2].sum() == pytest.approx(expected)
        assert second.metrics["loss/cov_dropped_frac"] == 0


def test_selection_is_exact_when_stats_are_gathered_in_float64():
    """The learner may gather float32 tokens as float64: the losses redo the selection in the
    statistics' dtype, so the k-th Cov itself still passes the threshold."""
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        logprobs = -torch.rand(64, generator=gen) * 5
        inputs = LossInputs(
            logprobs=logprobs[None],
            old_logprobs=logprobs[None] - 0.1,
            advantages=torch.randn(1, 64, generator=gen),
            loss_mask=torch.ones(1, 64),
        )
        built = POLICY_LOSSES.build("kl_cov", {"kl_ratio": 0.1})
        tokens = token_batch(inputs)
        wide = TokenBatch(tokens.logprobs.double(), tokens.old_logprobs.double(), tokens.advantages.double())
        out = built(inputs, batch_stats=batch_stats_fn(built)(wide))
        assert out.metrics["loss/cov_penalised_frac"].item() * 64 == pytest.approx(6)


# --------------------------------------------------------------------------------------------
# (c) hand-computed global statistics


def _two_rows(logprobs, advantages, old_shift=0.0, entropy=None) -> list[LossInputs]:
    """One micro-batch per row of the given lists."""
    batches = []
    for i, row in enumerate(logprobs):
        lp = torch.tensor([row], dtype=torch.float64, requires_grad=True)
        batches.append(
            LossInputs(
                logprobs=lp,
                old_logprobs=lp.detach() - old_shift,
                advantages=torch.tensor([advantages[i]], dtype=torch.float64),
                loss_mask=torch.ones_like(lp),
                entropy=None if entropy is None else torch.tensor([entropy[i]], dtype=torch.float64),
            )
        )
    return batches


def test_kl_cov_global_threshold_hand_values():
    # means over both micro-batches: log pi -2, A 0. Cov = (A - 0)(log pi + 2):
    #   batch 1: 2*1 = 2, 0*0 = 0, -1*-1 = 1      batch 2: 0, -1*1 = -1, 0
    # N = 6, k = floor(0.2 * 6) = 1: threshold 2, only token (1, 0) is penalised.
    batches = _two_rows([[-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0]], [[2.0, 0.0, -1.0], [0.0, -1.0, 0.0]], 0.5)
    built = POLICY_LOSSES.build("kl_cov", {"kl_ratio": 0.2})
    stats = batch_stats_fn(built)(TokenBatch.cat([token_batch(b) for b in batches]))
    assert stats["logprob_mean"].item() == -2.0 and stats["advantage_mean"].item() == 0.0
    assert stats["cov_threshold"].item() == 2.0
    # log r = 0.5: l = -A e^0.5, + 0.5 where penalised
    r = math.exp(0.5)
    expected = [[-2 * r + 0.5, 0.0, r], [0.0, r, 0.0]]
    for batch, row in zip(batches, expected, strict=True):
        out = built(batch, batch_stats=stats)
        torch.testing.assert_close(out.per_token_loss, torch.tensor([row], dtype=torch.float64))
    # micro-batch scope: batch 2 alone (means -2, -1/3) has Cov 0, -2/3, -1/3 and penalises its top
    # token (2, 0) too: one penalty per micro-batch, two in all instead of one.
    local = built(batches[1]).per_token_loss
    torch.testing.assert_close(local, torch.tensor([[0.5, r, 0.0]], dtype=torch.float64))


def test_aepo_global_z_score_hand_values():
    # entropies 1, 2 | 3, 6 over two micro-batches: mean 3, unbiased std sqrt(14/3)
    batches = _two_rows([[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], entropy=[[1.0, 2.0], [3.0, 6.0]])
    built = POLICY_LOSSES.build("aepo")  # a = 0.2
    stats = batch_stats_fn(built)(TokenBatch.cat([token_batch(b) for b in batches]))
    std = math.sqrt(14 / 3)
    assert stats["entropy_mean"].item() == 3.0
    assert stats["entropy_std"].item() == pytest.approx(std)
    # r = 1 (inside the clip): l = -A (1 + 0.2 z), z = (H - 3) / std
    for batch, entropies in zip(batches, [[1.0, 2.0], [3.0, 6.0]], strict=True):
        expected = [[-(1 + 0.2 * (h - 3) / std) for h in entropies]]
        out = built(batch, batch_stats=stats)
        torch.testing.assert_close(out.per_token_loss, torch.tensor(expected, dtype=torch.float64))
    # micro-batch scope: batch 1 alone has mean 1.5, std sqrt(1/2): z = -+0.7071
    z = 0.5 / math.sqrt(0.5)
    local = built(batches[0]).per_token_loss
    torch.testing.assert_close(local, torch.tensor([[-(1 - 0.2 * z), -(1 + 0.2 * z)]], dtype=torch.float64))


def test_hapo_global_quantile_and_range():
    entropy = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    tokens = TokenBatch(torch.zeros(5), torch.zeros(5), torch.zeros(5), entropy)
    stats = hapo_batch_stats(tokens, POLICY_LOSSES.make_params("hapo", {"entropy_pivot": 0.5}))
    # log H = 0, l, 2l, 3l, 4l (l = ln 2): median 2l, deviations -2l .. 2l
    ln2 = math.log(2)
    assert stats["log_entropy_pivot"].item() == pytest.approx(2 * ln2)
    assert stats["deviation_max"].item() == pytest.approx(2 * ln2)
    assert stats["deviation_min"].item() == pytest.approx(-2 * ln2)
    for q in (0.0, 0.3, 0.8, 1.0):
        values = torch.randn(101, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).exp()
        got = hapo_batch_stats(
            TokenBatch(*(torch.zeros(101),) * 3, values),
            POLICY_LOSSES.make_params("hapo", {"entropy_pivot": q}),
        )
        assert torch.equal(got["log_entropy_pivot"], torch.quantile(values.log(), q))
