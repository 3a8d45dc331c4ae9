"""PPO's critic: the clipped value loss by hand, and the real DeepSpeed critic on a tiny Llama
(values only on sampled tokens, independent of micro-batching, fitted towards the returns),
then GAE end to end through the loop with a checkpoint and resume.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_critic.py -q
"""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer.learner_worker import GradientRecorder, assert_same_gradients, fixed_batch
from trainer.config import load
from trainer.value import clipped_value_loss, explained_variance

ROOT = Path(__file__).resolve().parents[2]


def test_clipped_value_loss_by_hand():
    # token 0: V moved 0.5 up from 0.5 -> clipped to 0.7; R = 0: (1-0)^2 = 1 > (0.7-0)^2 = 0.49
    # token 1: V fell to 0.2 from 0.5 -> clipped 0.3; R = 1: (0.2-1)^2 = 0.64 > (0.3-1)^2 = 0.49
    # token 2: V = 1 from 0.5 -> clipped 0.7; R = 2: (1-2)^2 = 1 < (0.7-2)^2 = 1.69 (clip wins)
    # token 3: masked: 0 whatever its values
    values = torch.tensor([[1.0, 0.2, 1.0, 9.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.32, 0.845, 0.0]]))
    assert metrics["critic/clip_frac"].item() == pytest.approx(1 / 3)
    unclipped, _ = clipped_value_loss(values, old, returns, mask, clip=0.0)
    torch.testing.assert_close(unclipped, torch.tensor([[0.5, 0.32, 0.5, 0.0]]))


def test_value_loss_gradient_stops_at_the_clip():
    # V beyond old + clip on the side away from R: the clipped branch is constant in V -> no
    # gradient pushes V further; the unclipped branch wins when it is larger
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, _ = clipped_value_loss(
        values, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), clip=0.2
    )
    loss.sum().backward()
    assert values.grad.item() == 0.0


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 7.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones(4), mask))  # constant returns


@pytest.fixture(scope="module")
def critic_factory(learner_model_dir):
    from trainer.learner.critic import DeepSpeedCritic

    def make(*overrides: str):
        cfg = load(None, ["learner.threads=1", "critic.lr=1e-2", "critic.value_clip=0", *overrides])
        return DeepSpeedCritic(cfg, learner_model_dir)

    return make


def test_values_start_at_zero_and_follow_the_loss_mask(critic_factory):
    samples, _ = fixed_batch()
    critic = critic_factory()
    values = critic.values(samples)
    assert [len(v) for v in values] == [len(s.response_ids) for s in samples]
    assert all(torch.equal(v, torch.zeros(len(v))) for v in values)  # zero-initialised head


def test_critic_update_ignores_micro_batching(critic_factory):
    samples, _ = fixed_batch()
    returns = [torch.tensor(s.loss_mask, dtype=torch.float) * (1.0 + s.group_id) for s in samples]
    whole = critic_factory("learner.micro_batch_tokens=4096")
    split = critic_factory("learner.micro_batch_tokens=16")  # one prompt group per micro-batch
    recorded = []
    for critic in (whole, split):
        with GradientRecorder() as grads:
            critic.update(samples, returns, critic.values(samples))
        recorded.append(grads)
    # the same gradient at the optimizer step (not the values after AdamW at lr 1e-2, whose first
    # step is lr * sign(g) and flips on near-zero entries with the summation order)
    assert_same_gradients(*recorded)


def test_critic_fits_per_prompt_returns(critic_factory):
    samples, _ = fixed_batch()
    returns = [torch.tensor(s.loss_mask, dtype=torch.float) * (1.0 + s.group_id) for s in samples]
    critic = critic_factory()
    first = critic.update(samples, returns, critic.values(samples))
    for _ in range(29):
        last = critic.update(samples, returns, critic.values(samples))
    assert first["loss/critic"] == pytest.approx(
        0.5 * sum(float((r**2).sum()) for r in returns) / 32, rel=1e-5
    )  # V = 0
    assert last["loss/critic"] < 0.01 * first["loss/critic"]
    assert last["critic/explained_variance"] > 0.9  # of the values this update started from
    for s, v, r in zip(samples, critic.values(samples), returns, strict=True):
        mask = torch.tensor(s.loss_mask) > 0
        assert torch.all(v[~mask] == 0)  # env tokens get no value
        torch.testing.assert_close(v[mask], r[mask], atol=0.3, rtol=0)


def test_ppo_with_gae_trains_checkpoints_and_resumes(number_model_dir, game_cache, monkeypatch, tmp_path):
    """configs/algo/ppo.yaml on cpu_tiny: the critic trains beside the policy, its state is in the
    checkpoint, and a resumed run loads it (values equal to the saved critic's)."""
    from trainer.loop import Trainer

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    config = tmp_path / "ppo.yaml"
    config.write_text(
        f"defaults: [{ROOT / 'configs/debug/cpu_tiny.yaml'}, {ROOT / 'configs/algo/ppo.yaml'}]\n"
    )
    threads = torch.get_num_threads()
    overrides = [
        f"model.name={number_model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.tasks_per_step=2",
        "train.save_every=1", "train.eval_before=false", "train.eval_after=false", "train.save_model=false",
        "learner.threads=1", "critic.warmup_steps=1", "critic.lr=1e-3",
    ]  # fmt: skip
    try:
        run = Trainer(load(config, [*overrides, "train.steps=2"]))
        assert run.critic is not None
        run.train()
        first, second = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        assert first["learner/critic_warmup"] == 1.0 and "loss/policy" not in first  # critic only
        assert "loss/critic" in first and "loss/critic" in second and "loss/policy" in second
        assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "critic").is_dir()
        samples = run.last_samples
        trained = run.critic.values(samples)
        resumed = Trainer(load(config, [*overrides, "train.steps=3"]))
        assert resumed.start_step == 2
        for a, b in zip(trained, resumed.critic.values(samples), strict=True):
            torch.testing.assert_close(a, b)
    finally:
        torch.set_num_threads(threads)
