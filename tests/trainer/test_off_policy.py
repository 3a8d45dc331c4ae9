"""Off-policy mode: truncated importance weights by hand, the learner applying them as exactly
the update of advantages scaled by the weights, recomputed pi_old for later mini-batches, and
the loop's bounded staleness (the engine lags the learner by at most max_staleness updates).

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_off_policy.py -q
"""

import math
from pathlib import Path

import pytest
import torch

from tests.trainer.learner_worker import GradientRecorder, assert_same_gradients, fixed_batch
from tests.trainer.test_learner import sample_logprobs
from trainer.config import ConfigError, load
from trainer.off_policy import mismatch_metrics, rollout_is_weights

ROOT = Path(__file__).resolve().parents[2]
BASE = ["learner.lr=1e-3", "learner.threads=1", "learner.micro_batch_tokens=4096"]


def test_truncated_weights_by_hand():
    old = torch.tensor([[-1.0, -1.0, -2.0, -5.0]])
    rollout = torch.tensor([[-1.0, -2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    token = rollout_is_weights(old, rollout, mask, "token", cap=2.0)
    torch.testing.assert_close(token, torch.tensor([[1.0, 2.0, math.exp(-1.0), 0.0]]))  # e^1 capped at 2
    # sequence: sum of log ratios 0 + 1 - 1 = 0 -> weight 1 on every valid token
    torch.testing.assert_close(rollout_is_weights(old, rollout, mask, "sequence", 2.0), mask)
    torch.testing.assert_close(rollout_is_weights(old, rollout, mask, "none", 2.0), mask)
    with pytest.raises(ValueError, match="token, sequence"):
        rollout_is_weights(old, rollout, mask, "tokens", 2.0)


def test_mismatch_is_zero_on_policy_and_positive_off_it():
    lp = torch.tensor([[-1.0, -3.0]])
    mask = torch.ones(1, 2)
    same = mismatch_metrics(lp, lp, mask)
    assert same["off_policy/kl_k3"].item() == 0.0 and same["off_policy/is_ratio_mean"].item() == 1.0
    # log ratio 1 on one token: k3 = e - 1 - 1 = 0.718; mean over 2 tokens
    off = mismatch_metrics(lp, lp - torch.tensor([[1.0, 0.0]]), mask)
    assert off["off_policy/kl_k3"].item() == pytest.approx((math.e - 2) / 2)


def test_bad_off_policy_keys_are_named():
    with pytest.raises(ConfigError, match="algo.rollout_is='tis'"):
        load(None, ["algo.rollout_is=tis"])
    with pytest.raises(ConfigError, match="train.max_staleness"):
        load(None, ["train.max_staleness=-1"])


def test_token_is_weights_equal_scaling_the_advantages(learner_model_dir):
    """Rollout log-probs set to pi_old - log(w): the update with rollout_is=token equals the
    update without correction on advantages multiplied by w (the weights are constants)."""
    from trainer.learner.deepspeed import DeepSpeedLearner

    samples, advantages = fixed_batch()
    probe = DeepSpeedLearner(load(None, BASE), learner_model_dir)
    current = sample_logprobs(probe.engine.module, samples)
    gen = torch.Generator().manual_seed(0)
    scaled = []
    for row, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        w = torch.empty(len(s.response_ids)).uniform_(0.5, 1.9, generator=gen)  # under the cap 2
        s.rollout_logprobs = (current[row, : len(w)] - w.log()).tolist()
        scaled.append(a * w)
    corrected = DeepSpeedLearner(load(None, [*BASE, "algo.rollout_is=token"]), learner_model_dir)
    with GradientRecorder() as got_grads:
        got = corrected.update(samples, advantages)
    plain = DeepSpeedLearner(load(None, BASE), learner_model_dir)
    with GradientRecorder() as want_grads:
        want = plain.update(samples, scaled)
    assert got["loss/policy"] == pytest.approx(want["loss/policy"], rel=1e-5)
    assert got["learner/grad_norm"] == pytest.approx(want["learner/grad_norm"], rel=1e-4)
    assert got["off_policy/kl_k3"] > 0 and want["off_policy/kl_k3"] > 0  # measured either way
    # the same gradient (not the same post-AdamW weights: see GradientRecorder)
    assert_same_gradients(got_grads, want_grads)


def test_stale_runs_recompute_pi_old_before_the_first_optimizer_step(learner_model_dir):
    """Two mini-batches with max_staleness > 0: the second mini-batch's ratio is taken against
    the weights before the update (recorded), not the engine's rollout log-probs."""
    from trainer.learner.deepspeed import DeepSpeedLearner

    samples, advantages = fixed_batch()
    for s in samples:
        s.rollout_logprobs = [-1.0] * len(s.response_ids)  # an engine far from the learner
    overrides = [*BASE, "learner.mini_batches=2", "train.tasks_per_step=2"]
    stale = DeepSpeedLearner(load(None, [*overrides, "train.max_staleness=1"]), learner_model_dir)
    before = sample_logprobs(stale.engine.module, samples)
    recorded = stale._recorded_old_logprobs(samples)
    for row, (s, old) in enumerate(zip(samples, recorded, strict=True)):
        torch.testing.assert_close(old, before[row, : len(s.response_ids)], atol=1e-5, rtol=0)
    metrics = stale.update(samples, advantages)
    # pi_old = the pre-update policy: the first mini-batch's ratio is exactly 1, nothing clipped
    assert metrics["off_policy/kl_k3"] > 1.0  # mu (-1 everywhere) is far from pi_old (~ -4.2)
    # several optimizer steps per rollout recompute pi_old with or without lag; one pass never does
    on_policy = DeepSpeedLearner(load(None, overrides), learner_model_dir)
    single = DeepSpeedLearner(load(None, BASE), learner_model_dir)
    assert on_policy._recompute_old() is True and stale._recompute_old() is True
    assert single._recompute_old() is False


def test_several_mini_batches_take_pi_old_from_the_learner_not_the_engine(learner_model_dir):
    """No staleness, two mini-batches, an engine whose log-probs are far from the learner's
    (a bf16 / vLLM mismatch, exaggerated): the ratio is taken against the recorded pi_old, so the
    first mini-batch's ratio is exactly 1 and little is clipped; against mu every token would be
    clipped. The mismatch pi_old / mu is measured either way."""
    from trainer.learner.deepspeed import DeepSpeedLearner

    samples, advantages = fixed_batch()
    for s in samples:
        s.rollout_logprobs = [-1.0] * len(s.response_ids)  # mu; the learner's are ~ -4.2
    overrides = [*BASE, "learner.mini_batches=2", "train.tasks_per_step=2"]
    learner = DeepSpeedLearner(load(None, overrides), learner_model_dir)
    metrics = learner.update(samples, advantages)
    assert metrics["learner/optimizer_steps"] == 2.0
    assert metrics["loss/clipfrac"] < 0.25  # with pi_old = mu: 0.5 (every A < 0 token, r ~ e^-3.2)
    assert metrics["off_policy/ratio_outside_frac"] == 1.0  # every token: pi_old / mu ~ e^-3.2
    assert 2.5 < metrics["off_policy/log_ratio_abs_mean"] <= metrics["off_policy/log_ratio_abs_max"] < 5.0
    assert metrics["time/pi_old_recompute"] > 0  # its cost is logged; one pass runs none (0.0)


def test_engine_lags_the_learner_by_at_most_max_staleness(
    number_model_dir, game_cache, monkeypatch, tmp_path
):
    from trainer.loop import Trainer

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    threads = torch.get_num_threads()
    cfg = load(
        ROOT / "configs/debug/cpu_tiny.yaml",
        [
            f"model.name={number_model_dir}", f"train.output_dir={tmp_path}", "train.steps=3",
            "train.eval_before=false", "train.eval_after=false", "train.save_model=false",
            "train.max_staleness=1", "algo.rollout_is=token", "learner.threads=1", "learner.lr=1e-2",
        ],
    )  # fmt: skip
    try:
        run = Trainer(cfg)
        engine_weights = lambda: {k: v.clone() for k, v in run.engine.model.named_parameters()}  # noqa: E731
        last_synced = engine_weights()  # the initial weights
        staleness, trained = [], 0.0
        for step in (1, 2, 3):
            run.current_step = step
            metrics = run.step()
            staleness.append(metrics["rollout/staleness"])
            trained += metrics.get("learner/optimizer_steps", 0.0)
            if step % 2 == 0:  # a sync step: the engine now holds the learner's weights
                last_synced = {k: w.clone() for k, w in run.learner.named_weights()}
            for name, weight in engine_weights().items():
                assert torch.equal(weight, last_synced[name]), (step, name)
        assert staleness == [0.0, 1.0, 0.0]
        assert trained > 0  # the learner moved, so "equal to the last sync" is a real check
    finally:
        torch.set_num_threads(threads)
