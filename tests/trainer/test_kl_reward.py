"""KL to the reference in the reward (algo.kl_in_reward): the shaping by hand, and through the
loop, where the penalty is ~0 while the engine still holds the reference's weights.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_kl_reward.py -q
"""

from pathlib import Path

import pytest
import torch

from agents.types import Trajectory
from trainer.config import ConfigError, load
from trainer.loop import compute_advantages
from trainer.regularizers import kl_in_reward

ROOT = Path(__file__).resolve().parents[2]


def test_kl_shaped_rewards_by_hand():
    # k1 = log pi - log ref: row 0 [0.5, 0], row 1 [-0.5]; coef 0.1 -> penalties 0.05 and -0.05
    rewards = torch.tensor([1.0, 0.0])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    seq, tokens, metrics = kl_in_reward(rewards, logprobs, ref, mask, coef=0.1, kind="k1")
    torch.testing.assert_close(seq, torch.tensor([0.95, 0.05]))
    # the sequence reward sits on the last sampled token, the penalty on every sampled token
    # (row 1: reward 0 on its only token, minus a penalty of -0.05)
    torch.testing.assert_close(tokens, torch.tensor([[-0.05, 1.0, 0.0], [0.05, 0.0, 0.0]]))
    assert metrics["reward/kl_penalty"] == pytest.approx(0.0)  # (0.05 - 0.05) / 2
    assert metrics["kl/ref_in_reward"] == pytest.approx(0.0)  # (0.5 + 0 - 0.5) / 3


def test_reinforce_pp_reads_the_kl_token_rewards():
    """REINFORCE++ returns-to-go include the per-token penalties (gamma 1): with the penalty
    only on the first token, the first token's return is lower by exactly that penalty."""
    samples = [
        Trajectory([1], [5, 6], [1, 1], [-1.0, -1.0], [0.0, 0.0], 1.0, 0, 0),
        Trajectory([1], [5, 7], [1, 1], [-1.0, -1.0], [0.0, 0.0], 0.0, 0, 1),
    ]
    ref = [torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -1.0])]  # KL 1 on sample 0's first token
    cfg = load(None, ["algo.advantage.name=reinforce_plus_plus", "algo.kl_in_reward.coef=0.5"])
    plain, _, _ = compute_advantages(samples, cfg)
    shaped, metrics, _ = compute_advantages(samples, cfg, ref_logprobs=ref)
    assert metrics["reward/kl_penalty"] == pytest.approx(0.25)  # 0.5 * 1 on one of two samples
    # whitening is affine and shared, so compare the gap between sample 0's two tokens
    gap_plain = float(plain[0][1] - plain[0][0])
    gap_shaped = float(shaped[0][1] - shaped[0][0])
    assert gap_plain == pytest.approx(0.0, abs=1e-6) and gap_shaped > 0


def test_bad_kl_reward_keys_are_named():
    with pytest.raises(ConfigError, match="algo.kl_in_reward.kind='k4'"):
        load(None, ["algo.kl_in_reward.kind=k4"])


def test_kl_in_reward_through_the_loop(number_model_dir, game_cache, monkeypatch, tmp_path):
    from trainer.loop import Trainer

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    threads = torch.get_num_threads()
    cfg = load(
        ROOT / "configs/debug/cpu_tiny.yaml",
        [
            f"model.name={number_model_dir}", f"train.output_dir={tmp_path}", "train.steps=1",
            "train.eval_before=false", "train.eval_after=false", "train.save_model=false",
            "algo.kl_in_reward.coef=0.1", "learner.threads=1",
        ],
    )  # fmt: skip
    try:
        run = Trainer(cfg)
        assert run.learner.ref_model is not None
        run.current_step = 1
        metrics = run.step()
    finally:
        torch.set_num_threads(threads)
    # the rollout engine holds the reference's weights: only kernel noise separates them
    assert abs(metrics["kl/ref_in_reward"]) < 1e-3
