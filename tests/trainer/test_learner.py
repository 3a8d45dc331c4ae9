"""The DeepSpeed learner on one CPU rank: a step learns, and layout choices do not change it.

Every variant starts from the same tiny random Llama and takes one update on the same batch
(tests/trainer/learner_worker.py: 3 groups of 2 samples, advantages +1/-1, one all-zero group).
Packed vs padded rows, shared prompts or not, one micro-batch vs many (gradient accumulation),
and skipping zero-advantage samples must all give the same update: the same gradients at the
optimizer step (`learner_worker.GradientRecorder`; not the parameters after AdamW, whose first
step is lr * sign(grad) and flips on near-zero entries with the summation order), and the same
pre-clip grad norm.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_learner.py -q
(the first DeepSpeed learner on a machine JIT-builds its CPU comm op once, ~2 minutes).
"""

import math

import pytest
import torch

from tests.conftest import build_tiny_llama
from tests.trainer.learner_worker import VOCAB, GradientRecorder, assert_same_gradients, fixed_batch
from trainer.aggregation import aggregate
from trainer.config import load
from trainer.losses import POLICY_LOSSES, LossInputs

LR = 1e-3
BASE = [f"learner.lr={LR}", "learner.threads=1", "learner.micro_batch_tokens=4096"]


@pytest.fixture(scope="module")
def model_dir(learner_model_dir):
    return learner_model_dir


@pytest.fixture(scope="module")
def initial(model_dir):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}


@pytest.fixture(scope="module")
def updated(model_dir):
    """overrides -> (learner, metrics) after one update on the fixed batch; cached per variant."""
    from trainer.learner.deepspeed import DeepSpeedLearner

    cache = {}

    def run(*overrides: str):
        if overrides not in cache:
            learner = DeepSpeedLearner(load(None, BASE + list(overrides)), model_dir)
            with GradientRecorder() as learner.recorded_gradients:
                metrics = learner.update(*fixed_batch())
            cache[overrides] = learner, metrics
        return cache[overrides]

    return run


def params_of(learner) -> dict[str, torch.Tensor]:
    return {name: w.clone() for name, w in learner.named_weights()}


def assert_same_update(a, b, initial):
    """Same gradients at the optimizer step, and both learners moved every parameter."""
    assert_same_gradients(a.recorded_gradients, b.recorded_gradients)
    for learner in (a, b):
        moved = [name for name, w in params_of(learner).items() if not torch.equal(w, initial[name])]
        assert len(moved) == len(initial), f"unchanged: {set(initial) - set(moved)}"


def response_log_softmax(model, s) -> torch.Tensor:
    """[n, V] next-token log-probabilities at each response position, the sample run alone."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids]), use_cache=False).logits[0]
    p, n = len(s.prompt_ids), len(s.response_ids)
    return logits[p - 1 : p - 1 + n].log_softmax(-1)


def sample_logprobs(model, samples) -> torch.Tensor:
    """[B, T] logprobs of the response tokens, each sample run alone; 0 where loss_mask == 0."""
    width = max(len(s.response_ids) for s in samples)
    out = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        logp = response_log_softmax(model, s).gather(-1, torch.tensor(s.response_ids)[:, None])
        out[row, : len(s.response_ids)] = logp.squeeze(-1) * torch.tensor(s.loss_mask, dtype=torch.float)
    return out


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def test_update_changes_params_and_lowers_the_policy_loss(model_dir, initial):
    from trainer.learner.deepspeed import DeepSpeedLearner

    samples, advantages = fixed_batch()
    learner = DeepSpeedLearner(load(None, BASE), model_dir)
    before = sample_logprobs(learner.engine.module, samples)
    metrics = learner.update(samples, advantages)
    after = sample_logprobs(learner.engine.module, samples)

    assert metrics["learner/optimizer_steps"] == 1.0 and metrics["learner/grad_norm"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    changed = [name for name, w in params_of(learner).items() if not torch.equal(w, initial[name])]
    assert len(changed) == len(initial), f"unchanged: {set(initial) - set(changed)}"

    # the PPO objective on this batch, taken against the pre-update policy, went down
    width = before.shape[1]
    loss_mask = padded([torch.tensor(s.loss_mask, dtype=torch.float) for s in samples], width)
    adv = padded(advantages, width)
    loss_fn = POLICY_LOSSES.build("ppo_clip", {})

    def policy_loss(logprobs):
        out = loss_fn(LossInputs(logprobs=logprobs, old_logprobs=before, advantages=adv, loss_mask=loss_mask))
        return float(aggregate(out.per_token_loss, loss_mask, "token-mean"))

    assert policy_loss(after) < policy_loss(before)
    # ... because tokens with A > 0 became more likely and tokens with A < 0 less likely
    delta = (after - before).sum(-1) / loss_mask.sum(-1)
    sign = torch.tensor([float(a[0]) for a in advantages])
    assert bool((delta[sign > 0] > 0).all()) and bool((delta[sign < 0] < 0).all())


@pytest.mark.parametrize("variant", [("learner.packing=true",), ("learner.share_prefix=false",)])
def test_layout_does_not_change_the_update(updated, initial, variant):
    base, base_metrics = updated("learner.packing=false")
    other, metrics = updated(*variant)
    assert metrics["loss/policy"] == pytest.approx(base_metrics["loss/policy"], rel=1e-5, abs=1e-7)
    assert metrics["learner/grad_norm"] == pytest.approx(base_metrics["learner/grad_norm"], rel=1e-4)
    assert_same_update(base, other, initial)


def test_gradient_accumulation_over_micro_batches_gives_the_same_update(updated, initial, monkeypatch):
    import trainer.learner.deepspeed as ds

    calls = []
    real = ds.make_micro_batch
    monkeypatch.setattr(ds, "make_micro_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    # budget 1 token and no prompt sharing: one sample per micro-batch (4 non-skipped samples)
    small, small_metrics = updated("learner.micro_batch_tokens=1", "learner.share_prefix=false")
    assert len(calls) == 4
    calls.clear()
    large, large_metrics = updated("learner.packing=false")
    assert len(calls) <= 1  # cached, or one micro-batch
    assert small_metrics["learner/optimizer_steps"] == 1.0
    assert small_metrics["learner/grad_norm"] == pytest.approx(large_metrics["learner/grad_norm"], rel=1e-4)
    assert_same_update(small, large, initial)


def test_zero_advantage_samples_are_skipped_without_changing_the_update(updated, initial):
    skipping, metrics = updated("learner.packing=false")
    computing, no_skip_metrics = updated("learner.packing=false", "algo.skip_zero_advantage=false")
    assert metrics["learner/skipped_samples"] == 2.0  # the all-zero group
    assert no_skip_metrics["learner/skipped_samples"] == 0.0
    assert metrics["learner/sequence_tokens"] < no_skip_metrics["learner/sequence_tokens"]
    assert metrics["learner/grad_norm"] == pytest.approx(no_skip_metrics["learner/grad_norm"], rel=1e-4)
    assert_same_update(skipping, computing, initial)


def test_named_weights_make_an_engine_equal_to_the_learner(updated, smol_tokenizer):
    from agents.engines.hf import HFEngine

    learner, _ = updated("learner.packing=false")
    engine = HFEngine(build_tiny_llama(VOCAB, seed=1), smol_tokenizer)  # different random weights
    engine.load_weights(learner.named_weights())
    theirs = dict(learner.engine.module.named_parameters())
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, theirs[name]), name
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            engine.model(input_ids=ids).logits, learner.engine.module(input_ids=ids).logits
        )


# -- loss terms beyond the policy loss ----------------------------------------------------------

ENTROPY_BONUS = "algo.regularizers=[{name: entropy_bonus, params: {coef: 0.5}}]"


def make_learner(model_dir, *overrides: str):
    from trainer.learner.deepspeed import DeepSpeedLearner

    return DeepSpeedLearner(load(None, BASE + list(overrides)), model_dir)


def entropy_rows(model, samples) -> torch.Tensor:
    """[B, T] full-vocabulary entropy at each sampled response token, each sample run alone."""
    width = max(len(s.response_ids) for s in samples)
    out = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        logp = response_log_softmax(model, s)
        out[row, : len(s.response_ids)] = -(logp.exp() * logp).sum(-1) * torch.tensor(s.loss_mask, dtype=torch.float)
    return out


def test_entropy_is_computed_when_only_a_regulariser_needs_it(updated, initial):
    plain, plain_metrics = updated("learner.packing=false")
    bonus, metrics = updated("learner.packing=false", ENTROPY_BONUS)
    assert "entropy" not in plain.needs and "entropy/learner_mean" not in plain_metrics
    assert plain.ref_model is None  # no KL term: no reference copy
    assert "entropy" in bonus.needs and metrics["entropy/mean"] > 0
    # a regulariser is not zero at A = 0: the all-zero group is trained, not skipped
    assert metrics["learner/skipped_samples"] == 0.0
    assert metrics["loss/entropy_bonus"] == pytest.approx(-0.5 * metrics["entropy/mean"], rel=1e-4)
    assert metrics["loss/total"] == pytest.approx(
        metrics["loss/policy"] + metrics["loss/entropy_bonus"], rel=1e-5
    )
    assert metrics["loss/policy"] == pytest.approx(plain_metrics["loss/policy"], rel=1e-5, abs=1e-7)
    moved = max(
        float((w - p).abs().max())
        for w, p in zip(params_of(bonus).values(), params_of(plain).values(), strict=True)
    )
    assert moved > LR * 0.1, "the entropy bonus did not change the update"


@pytest.mark.parametrize("coef", [1.0, -1.0])
def test_entropy_bonus_sign_moves_the_policy_entropy(model_dir, coef):
    samples, advantages = fixed_batch(zero_groups=(0, 1, 2))  # A = 0: only the regulariser acts
    learner = make_learner(
        model_dir, f"algo.regularizers=[{{name: entropy_bonus, params: {{coef: {coef}}}}}]"
    )
    before = entropy_rows(learner.engine.module, samples)
    for _ in range(3):
        learner.update(samples, advantages)
    after = entropy_rows(learner.engine.module, samples)
    mask = padded([torch.tensor(s.loss_mask, dtype=torch.float) for s in samples], before.shape[1])
    change = float(((after - before) * mask).sum() / mask.sum())
    assert change * coef > 1e-4, f"coef {coef}: mean entropy changed by {change}"


def test_kl_to_the_reference_is_zero_before_the_first_step_and_positive_after(model_dir):
    learner = make_learner(model_dir, "algo.regularizers=[{name: kl, params: {coef: 0.1}}]")
    assert "ref_logprobs" in learner.needs and "entropy" not in learner.needs
    assert learner.ref_model is not None and not learner.ref_model.training
    assert not any(p.requires_grad for p in learner.ref_model.parameters())
    samples, advantages = fixed_batch()
    first = learner.update(samples, advantages)
    second = learner.update(samples, advantages)
    assert first["loss/kl_ref"] == pytest.approx(0.0, abs=1e-7)
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-7)
    assert second["loss/kl_ref"] > 1e-6 and second["loss/kl"] == pytest.approx(
        0.1 * second["loss/kl_ref"], rel=1e-4
    )


def test_forking_tokens_keep_the_top_fifth_by_entropy_in_the_policy_loss(updated, initial, model_dir):
    from transformers import AutoModelForCausalLM

    from trainer.losses import forking_token_mask

    learner, metrics = updated("learner.packing=false", "algo.forking_tokens=0.2")
    samples, advantages = fixed_batch()
    n = sum(s.num_sampled_tokens for s in samples)
    assert metrics["loss/selected_frac"] == pytest.approx(math.ceil(0.2 * n) / n)  # one micro-batch
    assert metrics["learner/skipped_samples"] == 0.0
    # on-policy, ppo_clip is -A per token: the policy term is -sum(A over the selected) / selected
    entropy = entropy_rows(AutoModelForCausalLM.from_pretrained(model_dir), samples)
    loss_mask = padded([torch.tensor(s.loss_mask, dtype=torch.float) for s in samples], entropy.shape[1])
    selected = forking_token_mask(entropy, loss_mask, 0.2)
    adv = padded(advantages, entropy.shape[1])
    expected = float(-(adv * selected).sum() / selected.sum())
    assert metrics["loss/policy"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert abs(expected - float(-(adv * loss_mask).sum() / loss_mask.sum())) > 1e-3  # the mask matters


def test_global_forking_threshold_does_not_depend_on_the_micro_batches(updated, initial):
    forking = ("algo.forking_tokens=0.2",)
    one_micro, one = updated("learner.packing=false", *forking, "algo.stats_scope=global")
    split = ("learner.micro_batch_tokens=1", "learner.share_prefix=false")
    many_micro, many = updated(*split, *forking, "algo.stats_scope=global")
    assert many["loss/selected_frac"] == one["loss/selected_frac"]
    assert many["loss/policy"] == pytest.approx(one["loss/policy"], rel=1e-4, abs=1e-7)
    assert_same_update(one_micro, many_micro, initial)
    # one micro-batch: the global threshold selects what the micro-batch top-k selects
    _, local = updated("learner.packing=false", *forking)
    assert local["loss/policy"] == pytest.approx(one["loss/policy"], rel=1e-5, abs=1e-7)
    # micro-batch scope: each of the 6 micro-batches keeps at least one token
    _, per_micro = updated(*split, *forking)
    assert per_micro["loss/selected_frac"] > one["loss/selected_frac"]


# Losses and hooks whose batch statistics honour stats_scope=global (their params make the
# statistic matter on this batch: KL-Cov penalises a top fraction, AEPO z-scores the entropy).
# KL-Cov's penalty is (log ratio)^2, zero with its gradient on an on-policy first pass: two
# epochs take the ratio against the rollout log-probs instead.
GLOBAL_STAT_TERMS = [
    ("algo.loss.name=kl_cov", "algo.loss.params={kl_ratio: 0.2, kl_coef: 1.0}", "learner.epochs=2"),
    ("algo.loss.name=aepo",),
    ("algo.loss.name=hapo",),
    ("algo.token_weights.name=steer",),
]


@pytest.mark.parametrize("term", GLOBAL_STAT_TERMS, ids=lambda t: t[0].split("=")[1])
def test_global_batch_statistics_do_not_depend_on_the_micro_batches(updated, initial, term):
    split = ("learner.micro_batch_tokens=1", "learner.share_prefix=false")
    one_micro, one = updated("learner.packing=false", *term, "algo.stats_scope=global")
    many_micro, many = updated(*split, *term, "algo.stats_scope=global")
    # The statistics come from a no-grad pass over each layout; its float32 entropies differ
    # by layout in the last bits (~1e-7 relative: other matmul shapes), and the loss reads them
    # through thresholds and, for HAPO, log H over a deviation range, which amplifies that to
    # ~1.3e-4 (measured). Statistics taken per micro-batch instead move the gradients by 7-65 %
    # of their largest entry on this batch (aepo, hapo, steer): rel 1e-3 tells the two apart.
    rel = 1e-3
    assert many["loss/policy"] == pytest.approx(one["loss/policy"], rel=rel, abs=1e-7)
    assert many["learner/grad_norm"] == pytest.approx(one["learner/grad_norm"], rel=rel)
    assert_same_gradients(one_micro.recorded_gradients, many_micro.recorded_gradients, rel=rel)
    # one micro-batch: global statistics are the micro-batch's own (taken in float64, hence rel)
    _, local = updated("learner.packing=false", *term)
    assert local["loss/policy"] == pytest.approx(one["loss/policy"], rel=rel, abs=1e-7)


def test_micro_batch_scope_does_depend_on_the_micro_batches(updated):
    """The property above is not free: AEPO's per-micro-batch entropy z-scores differ."""
    term = GLOBAL_STAT_TERMS[1]
    _, one = updated("learner.packing=false", *term)
    _, many = updated("learner.micro_batch_tokens=1", "learner.share_prefix=false", *term)
    assert abs(many["loss/policy"] - one["loss/policy"]) > 1e-4


def test_controllers_are_updated_with_the_steps_reduced_statistics(model_dir):
    from types import SimpleNamespace

    from trainer.loop import Trainer

    regs = "algo.regularizers=[{name: epo}, {name: aent, params: {adaptive: true, entropy_low: 10.0}}]"
    learner = make_learner(model_dir, regs)
    assert set(learner.controllers) == {"epo", "aent"}
    assert {"entropy", "clamped_entropy"} <= learner.needs
    metrics = learner.update(*fixed_batch())
    stats = learner.controller_stats
    assert stats["batch/num_samples"] == 6.0
    assert stats["entropy/mean"] == pytest.approx(metrics["entropy/mean"], rel=1e-6)  # one micro-batch
    assert 0 < stats["entropy/clamped_mean"] < stats["entropy/mean"]
    logged = Trainer._update_controllers(SimpleNamespace(learner=learner))  # what the loop runs
    extra = learner.state_dict_extra()["controllers"]
    assert extra["epo"]["history"] == [pytest.approx(stats["entropy/mean"])]
    assert extra["aent"]["step"] == 1 and extra["aent"]["coef"] > 1e-3  # entropy below the band: c rises
    assert logged["ctrl/aent/coef"] == extra["aent"]["coef"] and logged["ctrl/epo/entropy_ref"] > 0


def test_terms_the_learner_cannot_feed_fail_at_build(model_dir):
    # per-turn EPO reads each row's turn, which whole-episode samples do not have
    with pytest.raises(ValueError, match="rollout.mode=step"):
        make_learner(model_dir, "rollout.mode=trajectory", "algo.regularizers=[{name: epo, params: {history: turn}}]")


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_loss_skips_the_update_and_the_next_one_trains(model_dir, initial, stage):
    """A NaN in one micro-batch's logprobs makes the gradient NaN: the optimizer step is skipped
    (weights and Adam state untouched, controllers not fed), and the next update runs normally."""
    learner = make_learner(
        model_dir, f"learner.zero_stage={stage}", "learner.micro_batch_tokens=1", "learner.share_prefix=false"
    )
    original, calls = learner._token_stats, [0]

    def poisoned(*args, **kwargs):
        stats, top_p = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 1:
            stats.logprobs = stats.logprobs * float("nan")
        return stats, top_p

    learner._token_stats = poisoned
    metrics = learner.update(*fixed_batch())
    assert calls[0] > 1, "the batch should span several micro-batches"
    assert metrics["learner/nonfinite_steps"] == 1.0 and metrics["learner/optimizer_steps"] == 0.0
    assert learner.controller_stats == {}
    for name, w in params_of(learner).items():
        assert torch.equal(w, initial[name]), f"{name} changed on a skipped step"

    metrics = learner.update(*fixed_batch())  # the poison is gone: a normal step
    assert metrics["learner/nonfinite_steps"] == 0.0 and metrics["learner/optimizer_steps"] == 1.0
    assert math.isfinite(metrics["loss/policy"]) and metrics["learner/grad_norm"] > 0
    assert any(not torch.equal(w, initial[name]) for name, w in params_of(learner).items())


def test_lora_trains_only_adapters_and_syncs_merged_weights(model_dir, initial, smol_tokenizer):
    """model.lora.rank > 0: the base weights stay frozen, the adapters learn, and the engine gets
    merged weights (W + scale * B A) under the plain model's names."""
    learner = make_learner(model_dir, "model.lora.rank=4", "model.lora.alpha=8")
    trainable = [n for n, p in learner.engine.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    metrics = learner.update(*fixed_batch())
    assert metrics["learner/optimizer_steps"] == 1.0
    base = {n: p for n, p in learner.engine.module.named_parameters() if "lora_" not in n}
    for name, param in base.items():
        plain = name.replace("base_model.model.", "").replace(".base_layer.", ".")
        assert torch.equal(param, initial[plain]), f"{plain} (frozen) changed"
    merged = dict(learner.named_weights())
    assert merged.keys() == initial.keys()
    changed = [n for n in merged if not torch.equal(merged[n], initial[n])]
    assert changed and all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                           for n in changed)  # fmt: skip
    # the merged weight is exactly W + (alpha / r) B A of the adapter
    layer = learner.engine.module.get_base_model().model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8 / 4)
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"] + delta)
