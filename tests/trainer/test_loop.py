"""The pure parts of the training loop: advantage inputs from step-wise samples (GiGPO, EMPG;
trainer/advantage_inputs.py), DAPO group selection and overlong shaping (trainer/dapo_batch.py),
and trainer/loop.py's dynamic-sampling rollout loop with a fake rollout (no model, no env).

Run: .venv/bin/python -m pytest tests/trainer/test_loop.py -x -q
"""

import math

import pytest
import torch

import trainer.loop as loop
from agents.rollout import RolloutResult
from agents.tasks import TaskSampler
from agents.types import Trajectory
from trainer.config import Config, NamedConfig, OverlongConfig
from trainer.loop import compute_advantages, select_groups, shape_overlong


def sample(group, traj, reward, turn=None, step_reward=0.0, anchor=None, entropies=(0.0,)):
    n = len(entropies)
    return Trajectory(
        prompt_ids=[1, 2],
        response_ids=[5] * n,
        loss_mask=[1] * n,
        rollout_logprobs=[0.0] * n,
        entropies=list(entropies),
        reward=reward,
        group_id=group,
        traj_id=traj,
        turn_idx=turn,
        step_reward=step_reward,
        anchor_key=anchor,
    )


def two_episodes(entropies=((0.0,), (0.0,), (0.0,), (0.0,))):
    """One group, two 2-turn episodes that both start in state "s0". Episode 0 wins (step reward
    1 at its second turn), episode 1 does not. Rows: (ep0 t0, ep0 t1, ep1 t0, ep1 t1)."""
    return [
        sample(0, 0, 1.0, turn=0, step_reward=0.0, anchor="s0", entropies=entropies[0]),
        sample(0, 0, 1.0, turn=1, step_reward=1.0, anchor="a1", entropies=entropies[1]),
        sample(0, 1, 0.0, turn=0, step_reward=0.0, anchor="s0", entropies=entropies[2]),
        sample(0, 1, 0.0, turn=1, step_reward=0.0, anchor="b1", entropies=entropies[3]),
    ]


def config(name, **params):
    cfg = Config()
    cfg.algo.advantage = NamedConfig(name, params)
    return cfg


def row_values(rows):
    """The (constant) advantage of each row."""
    for row in rows:
        assert torch.allclose(row, row[0].expand_as(row))
    return [float(row[0]) for row in rows]


def test_gigpo_through_compute_advantages():
    rows, metrics, _ = compute_advantages(two_episodes(), config("gigpo", gamma=0.95, step_weight=1.0))
    # A^E: episode rewards (1, 1, 0, 0) per sample, mean 0.5, mean_norm -> +-0.5.
    # Step returns: ep0 (0 + 0.95 * 1, 1), ep1 (0, 0). Anchor s0 = {0.95, 0}: mean 0.475 ->
    # A^S = +-0.475; a1 and b1 are singletons -> 0.
    assert row_values(rows) == pytest.approx([0.975, 0.5, -0.975, -0.5])
    assert metrics["adv/anchor_grouped_frac"] == pytest.approx(0.5)


def test_gigpo_needs_step_wise_samples():
    samples = [sample(0, 0, 1.0), sample(0, 1, 0.0)]  # trajectory mode: no turn_idx
    with pytest.raises(ValueError, match="turn_idx"):
        compute_advantages(samples, config("gigpo"))


def test_empg_through_compute_advantages():
    # Mean turn entropies (0, 1, 0.5, 1): min-max normalised to the same values.
    samples = two_episodes(entropies=((0.0, 0.0), (1.0,), (0.25, 0.75), (1.0,)))
    rows, _, _ = compute_advantages(samples, config("empg", k=1.0, k_next=1.0, zeta=0.05, eps=0.0, norm_by_std=False))
    h = [0.0, 1.0, 0.5, 1.0]
    scale = [math.exp(-x) for x in h]
    scale = [x / (sum(scale) / 4) for x in scale]
    grpo = [0.5, 0.5, -0.5, -0.5]
    bonus = [math.exp(-1.0), 0.0, math.exp(-1.0), 0.0]  # next turn's H~ = 1; last turns get 0
    modulated = [s * a + 0.05 * b for s, a, b in zip(scale, grpo, bonus, strict=True)]
    expected = [m - sum(modulated) / 4 for m in modulated]
    assert row_values(rows) == pytest.approx(expected, abs=1e-6)
    # Without turn_idx every sample would be a last turn: the bonus must have made a difference.
    assert expected[0] != pytest.approx(scale[0] * 0.5 - sum(s * a for s, a in zip(scale, grpo, strict=True)) / 4)


def test_select_groups_drops_equal_reward_groups_and_truncates():
    samples = [
        sample(0, 0, 1.0), sample(0, 1, 1.0),  # all equal: dropped
        sample(1, 2, 1.0), sample(1, 3, 0.0),  # mixed
        sample(2, 4, 0.0, turn=0), sample(2, 4, 0.0, turn=1), sample(2, 5, 1.0, turn=0),  # mixed, step-wise
        sample(3, 6, 0.5), sample(3, 7, 0.5),  # all equal: dropped
    ]  # fmt: skip
    kept, groups = select_groups(samples, target_groups=5)
    assert groups == [1, 2] and [s.traj_id for s in kept] == [2, 3, 4, 4, 5]
    kept, groups = select_groups(samples, target_groups=1)
    assert groups == [1] and [s.traj_id for s in kept] == [2, 3]


def test_select_groups_counts_each_step_wise_episode_once():
    # Episode 0 has three samples with reward 1, episode 1 one with reward 1: all equal.
    samples = [sample(0, 0, 1.0, turn=k) for k in range(3)] + [sample(0, 1, 1.0, turn=0)]
    assert select_groups(samples, 1) == ([], [])


def test_overlong_shaping_per_episode():
    samples = [
        sample(0, 0, 1.0, turn=0, entropies=(0.0,) * 3),
        sample(0, 0, 1.0, turn=1, entropies=(0.0,) * 4),  # episode 0: 7 generated tokens
        sample(0, 1, 0.0, turn=0, entropies=(0.0,) * 2),  # episode 1: 2 tokens, under L_max - L_c
    ]
    assert shape_overlong(samples, OverlongConfig(enabled=False, max_len=8, buffer=4)) == {}
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0]
    metrics = shape_overlong(samples, OverlongConfig(enabled=True, max_len=8, buffer=4, factor=1.0))
    # -(7 - (8 - 4)) / 4 * 1 = -0.75 on both samples of episode 0.
    assert [s.reward for s in samples] == pytest.approx([0.25, 0.25, 0.0])
    assert metrics["reward/overlong_frac"] == pytest.approx(0.5)
    assert metrics["reward/overlong_penalty"] == pytest.approx(-0.375)


# -- dynamic sampling with a fake rollout --------------------------------------------------------


class FakeRollout:
    """Two episodes per task; tasks whose seed is in `mixed` get rewards (1, 0), others (0, 0)."""

    def __init__(self, mixed):
        self.mixed = mixed
        self.calls = 0

    def run(self, tasks, sampling, seed=None):
        self.calls += 1
        samples = []
        for i, task in enumerate(tasks):
            first = i == 0 or tasks[i - 1].group_id != task.group_id
            reward = float(task.reset_options["seed"] in self.mixed and first)
            samples.append(sample(task.group_id, i, reward))
        return RolloutResult(samples, {"rollout/success": 0.5, "rollout/episodes": float(len(tasks))})


def fake_trainer(monkeypatch, mixed, tasks_per_step=2, max_gen_batches=3, seeds=8):
    monkeypatch.setattr(loop, "materialise", lambda env_id, seeds, level: [{"seed": s} for s in seeds])
    trainer = loop.Trainer.__new__(loop.Trainer)
    trainer.cfg = Config()
    trainer.cfg.algo.group_size = 2
    trainer.cfg.algo.dynamic_sampling = True
    trainer.cfg.algo.max_gen_batches = max_gen_batches
    trainer.cfg.train.tasks_per_step = tasks_per_step
    trainer.rank, trainer.world = 0, 1
    trainer.sampler = TaskSampler(list(range(seeds)), seed=0)
    order = TaskSampler(list(range(seeds)), seed=0).next(seeds * 2)
    trainer.rollout = FakeRollout({order[i] for i in mixed})
    return trainer


def check_ids(samples):
    by_traj = {}
    for s in samples:
        assert by_traj.setdefault(s.traj_id, s.group_id) == s.group_id  # an episode is in one group


def test_dynamic_sampling_refills_until_enough(monkeypatch):
    # Sampler positions 1 (batch 0) and 5 (batch 2) are mixed (6 would be batch 3, never
    # played): three batches are needed.
    trainer = fake_trainer(monkeypatch, mixed={1, 5, 6})
    result = trainer._collect()
    assert trainer.rollout.calls == 3 and trainer.sampler.position == 6
    assert result.metrics["rollout/gen_batches"] == 3 and result.metrics["rollout/kept_groups"] == 2
    assert result.metrics["rollout/episodes"] == 12  # summed over the three batches
    groups = sorted({s.group_id for s in result.samples})
    assert groups == [1, 5]  # batch b numbers its groups from b * tasks_per_step
    assert len({s.traj_id for s in result.samples}) == 4
    check_ids(result.samples)


def test_dynamic_sampling_stops_at_the_cap_and_keeps_exactly_the_target(monkeypatch):
    trainer = fake_trainer(monkeypatch, mixed={0}, max_gen_batches=2)
    result = trainer._collect()
    assert trainer.rollout.calls == 2 and result.metrics["rollout/kept_groups"] == 1
    trainer = fake_trainer(monkeypatch, mixed={0, 1, 2, 3})
    result = trainer._collect()  # both groups of batch 0 are mixed: no second batch
    assert trainer.rollout.calls == 1 and {s.group_id for s in result.samples} == {0, 1}


def _mean_worker(rank: int, port: int, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from trainer.loop import _mean_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 0 saw a stop reason rank 1 did not, and rank 1 played a 4th turn
    metrics = {"a": 1.0, "rollout/stop/terminated": 0.5} if rank == 0 else {"a": 3.0, "entropy/turn_3": 2.0}
    result = _mean_over_ranks(metrics)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_mean_over_ranks_with_different_keys(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_mean_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    expected = {"a": 2.0, "rollout/stop/terminated": 0.5, "entropy/turn_3": 2.0}  # mean over reporters
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_infra_failed_episodes_take_their_branches_with_them():
    from trainer.sampling import infra_failed_episodes

    rows = [
        (0, None, "terminated"),
        (1, None, "env_error"),  # crashed root
        (2, 1, "terminated"),  # forked from the crashed root
        (3, 2, "max_turns"),  # forked from that branch
        (4, 0, "engine_error"),  # a failed branch of a healthy root
        (5, None, "timeout"),
        (5, None, "timeout"),  # step-wise: an episode repeats
        (6, 0, "truncated"),
        (7, None, "parse_error_limit"),  # the policy's own failure: trained on
    ]
    assert infra_failed_episodes(rows) == {1, 2, 3, 4, 5}
    assert infra_failed_episodes([(0, None, "terminated"), (1, 0, "max_tokens")]) == set()


class CrashingRollout(FakeRollout):
    """Group 0's second episode crashed its env; every step-wise sample of it says so."""

    def run(self, tasks, sampling):
        result = super().run(tasks, sampling)
        for s in result.samples:
            if s.traj_id == 1:
                s.stop_reason = "env_error"
        return result


@pytest.mark.parametrize("exclude", [True, False])
def test_episodes_ended_by_a_fault_are_left_out_of_the_update(monkeypatch, exclude):
    trainer = fake_trainer(monkeypatch, mixed=set())
    trainer.cfg.algo.dynamic_sampling = False
    trainer.cfg.train.exclude_infra_failures = exclude
    trainer.rollout = CrashingRollout(set())
    result = trainer._rollout_batch(0, 0)
    trajs = {s.traj_id for s in result.samples}
    if exclude:
        assert trajs == {0, 2, 3} and result.metrics["rollout/excluded_episodes"] == 1.0
    else:
        assert trajs == {0, 1, 2, 3} and "rollout/excluded_episodes" not in result.metrics


class EvalRollout:
    """Eval episodes: one won, one lost by the policy, one ended by an env crash."""

    def run(self, tasks, sampling, seed=None):
        rows = [("terminated", True, None), ("max_turns", False, None), ("env_error", False, "RuntimeError: boom")]
        episodes = [
            {"won": won, "stop_reason": reason, "error": error, "turns": 2, "parse_errors": 0, "task": {"seed": i}}
            for i, (reason, won, error) in enumerate(rows)
        ]
        return RolloutResult([], {}, episodes=episodes)


def test_eval_reports_episodes_ended_by_a_fault(monkeypatch):
    from types import SimpleNamespace

    trainer = fake_trainer(monkeypatch, mixed=set())
    trainer.rollout, trainer.learner, trainer.current_step = EvalRollout(), None, 0
    logged = []
    trainer.logger = SimpleNamespace(log=lambda step, metrics, *a: logged.append(metrics), info=logged.append)
    metrics = trainer.evaluate(step=0)
    assert metrics["eval/success"] == pytest.approx(1 / 3)  # the crash counts as lost ...
    assert metrics["eval/infra_failures"] == 1.0  # ... and is said apart
    assert any(isinstance(m, str) and "1 of 3 episodes" in m and "boom" in m for m in logged)
