"""The clip-based presets run on an update schedule under which their clip acts.

With one on-policy pass pi_old is the current policy, the ratio is exactly 1 and no clip, bound
or ratio penalty can ever fire, whatever the learning rate. Each preset now takes several
optimizer steps per rollout (its header names the paper's schedule): one real update of the
preset on the fixed batch (tiny Llama, real DeepSpeed) reports its counter > 0, and the same
update in one pass reports exactly 0. A high learning rate makes the ratios move far enough in
one step on this tiny model; the single-pass control shows that no learning rate could.

A pure check beside it: on a fixed batch with ratios off 1, each preset's loss gives another
gradient than the unclipped objective -A r.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer.learner_worker import fixed_batch
from trainer.config import load
from trainer.losses import POLICY_LOSSES, LossInputs

ROOT = Path(__file__).resolve().parents[2]
# preset -> the metric that counts what its clip / bound / penalty did
COUNTERS = {
    "dapo": "loss/clipfrac",
    "gspo": "loss/clipfrac",
    "aepo": "loss/clipfrac",
    "bapo": "loss/clipfrac",
    "ce_gppo": "loss/clipfrac",
    "kl_cov": "loss/kl_cov_penalty",
    "ppo": "loss/clipfrac",
    "epo": "loss/clipfrac",
}
# Not here: clip_cov, whose token dropping reads covariances (not the ratio: it acts in one pass
# too, tested in test_losses) and whose PPO range [0, 2] this batch never leaves.
FAST = ["learner.lr=0.05", "learner.threads=1", "learner.micro_batch_tokens=4096", "algo.skip_zero_advantage=false"]


def _update(model_dir, preset: str, *overrides: str) -> dict:
    from trainer.learner.deepspeed import DeepSpeedLearner

    cfg = load(ROOT / "configs/algo" / f"{preset}.yaml", [*FAST, "algo.group_size=2", *overrides])
    if cfg.algo.advantage.name == "gae":  # PPO's critic is not what is tested: GRPO rows stand in
        cfg.algo.advantage.name, cfg.algo.advantage.params = "grpo", {}
    learner = DeepSpeedLearner(cfg, model_dir)
    samples, advantages = fixed_batch()
    return learner.update(samples, advantages)


@pytest.mark.parametrize("preset", COUNTERS)
def test_each_clip_preset_acts_on_its_schedule_and_not_in_one_pass(learner_model_dir, preset):
    cfg = load(ROOT / "configs/algo" / f"{preset}.yaml")
    assert cfg.learner.mini_batches * cfg.learner.epochs > 1, "one pass: the clip is inert"
    key = COUNTERS[preset]
    scheduled = _update(learner_model_dir, preset)
    assert scheduled["learner/optimizer_steps"] == cfg.learner.mini_batches * cfg.learner.epochs
    assert scheduled[key] > 0, f"{preset}: {key} = {scheduled[key]} on its own schedule"
    one_pass = _update(learner_model_dir, preset, "learner.mini_batches=1", "learner.epochs=1")
    assert one_pass[key] == 0.0, f"{preset}: {key} = {one_pass[key]} with ratio 1"


def _off_policy_inputs() -> tuple[LossInputs, torch.Tensor]:
    """Two rows (3 and 2 valid tokens), ratios from 0.5 to 1.6, advantages of both signs."""
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.5, -0.7, 0.0, 0.0]])
    shift = torch.tensor([[0.47, -0.69, 0.1, 0.0], [-0.3, 0.2, 0.0, 0.0]])  # log r
    logprobs = (old + shift).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-0.8, 0.9, 0.0, 0.0]])
    entropy = torch.tensor([[2.0, 0.3, 1.1, 0.0], [0.9, 1.7, 0.0, 0.0]])
    inputs = LossInputs(logprobs=logprobs, old_logprobs=old, advantages=adv, loss_mask=mask, entropy=entropy)
    return inputs, logprobs


def _grad(loss_name: str, params: dict) -> torch.Tensor:
    inputs, logprobs = _off_policy_inputs()
    out = POLICY_LOSSES.build(loss_name, params)(inputs)
    (out.per_token_loss * inputs.loss_mask).sum().backward()
    return logprobs.grad


@pytest.mark.parametrize("preset", COUNTERS)
def test_each_preset_loss_differs_from_the_unclipped_objective_off_policy(preset):
    cfg = load(ROOT / "configs/algo" / f"{preset}.yaml")
    inputs, logprobs = _off_policy_inputs()
    ratio = (logprobs - inputs.old_logprobs).exp()
    (-(inputs.advantages * ratio) * inputs.loss_mask).sum().backward()
    unclipped = logprobs.grad
    got = _grad(cfg.algo.loss.name, dict(cfg.algo.loss.params))
    assert not torch.allclose(got, unclipped, atol=1e-6), f"{preset}: same gradient as -A r"
