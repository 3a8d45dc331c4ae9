"""Multi-turn credit (issue #19 item 4, RLOO part of item 5), against hand-computed values:

- GiGPO's step level uses the configured reward, the scale of its episode level;
- per-turn env rewards reach GAE and REINFORCE++ as token rewards (trajectory and step mode);
- step-wise branched rollouts get tree credit (grpo_tree): a shared turn is credited by every
  episode that played it;
- EPO's nested mean (trajectory -> turn -> token, arXiv 2509.22576 Eq. 2);
- RLOO with algo.group_size=1 is rejected when the config loads.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_credit.py -q
"""

import pytest
import torch

from agents.types import Trajectory
from trainer.advantages import ADVANTAGES, AdvantageInputs
from trainer.aggregation import aggregate
from trainer.config import Config, ConfigError, NamedConfig, load
from trainer.loop import compute_advantages
from trainer.losses import LossInputs
from trainer.regularizers import REGULARIZERS


def step(traj, turn, reward, env, anchor=None, mask=(1,), parent=None, fork=None, group=0):
    """One step-wise sample: turn `turn` of episode `traj`, env reward `env` after it."""
    n = len(mask)
    return Trajectory(
        prompt_ids=[1, 2, turn],
        response_ids=[5] * n,
        loss_mask=list(mask),
        rollout_logprobs=[0.0] * n,
        entropies=[0.0] * n,
        reward=reward,
        group_id=group,
        traj_id=traj,
        turn_idx=turn,
        step_reward=env,
        anchor_key=anchor,
        parent_id=parent,
        fork_turn=fork,
    )


def config(name, rewards=None, **params):
    cfg = Config()
    cfg.algo.advantage = NamedConfig(name, params)
    cfg.rollout.rewards = dict(rewards or {})
    return cfg


def row_values(rows):
    for row in rows:
        assert torch.allclose(row, row[0].expand_as(row))
    return [float(row[0]) for row in rows]


# -- GiGPO: one reward for both levels ------------------------------------------------------------


def test_gigpo_step_returns_use_the_configured_reward_not_the_raw_env_reward():
    # ALFWorld: the env pays 1 for a win, the configured reward (success: 10) is 10. Episode 0 wins
    # at turn 1, episode 1 does not; both start in state s0. Reward has no `score` term, so the
    # per-turn rewards are (0, R): ep0 (0, 10), ep1 (0, 0).
    samples = [
        step(0, 0, 10.0, 0.0, "s0"),
        step(0, 1, 10.0, 1.0, "a"),
        step(1, 0, 0.0, 0.0, "s0"),
        step(1, 1, 0.0, 0.0, "b"),
    ]
    rows, _, _ = compute_advantages(samples, config("gigpo", {"success": 10.0}, gamma=0.5, step_weight=1.0))
    # A^E (mean_norm): mean 5 -> +-5. Step returns (gamma .5): ep0 t0 = .5 * 10 = 5, ep1 t0 = 0;
    # anchor s0 {5, 0} -> +-2.5 (the raw env reward gave +-0.25: a tenth of the episode scale).
    assert row_values(rows) == pytest.approx([7.5, 5.0, -7.5, -5.0])


def test_gigpo_step_rewards_split_the_configured_reward_over_turns():
    # rewards {success: 1, score: 0.5}: r_k = 0.5 e_k, and the last turn also gets R - 0.5 sum e.
    # ep0: env (0.2, 0, 0.4), won: R = 1 + 0.5 * 0.6 = 1.3 -> r = (0.1, 0, 1.2) (sum 1.3)
    # ep1: env (0.2, 0.1), lost:   R = 0.5 * 0.3 = 0.15    -> r = (0.1, 0.05)   (sum 0.15)
    samples = [
        step(0, 0, 1.3, 0.2, "s0"),
        step(0, 1, 1.3, 0.0, "x"),
        step(0, 2, 1.3, 0.4, "y"),
        step(1, 0, 0.15, 0.2, "s0"),
        step(1, 1, 0.15, 0.1, "x"),
    ]
    cfg = config("gigpo", {"success": 1.0, "score": 0.5}, gamma=0.5, step_weight=1.0)
    rows, _, _ = compute_advantages(samples, cfg)
    # step returns (gamma .5): ep0 t2 1.2, t1 .6, t0 .1 + .3 = .4; ep1 t1 .05, t0 .1 + .025 = .125
    # anchors: s0 {.4, .125} -> +-.1375; x {.6, .05} -> +-.275; y alone -> 0
    # A^E (per sample, mean_norm): mean (3 * 1.3 + 2 * .15) / 5 = .84 -> .46 / -.69
    expected = [0.46 + 0.1375, 0.46 + 0.275, 0.46, -0.69 - 0.1375, -0.69 - 0.275]
    assert row_values(rows) == pytest.approx(expected, abs=1e-6)


# -- per-turn env rewards as token rewards ----------------------------------------------------------


def episode(reward=1.3):
    """A trajectory-mode episode: replies of 2, 2 and 1 tokens with one env token after the first
    two (positions 2 and 5), env rewards (0.2, 0, 0.4) after the three turns."""
    mask = [1, 1, 0, 1, 1, 0, 1]
    return Trajectory(
        prompt_ids=[1, 2],
        response_ids=[5] * 7,
        loss_mask=mask,
        rollout_logprobs=[0.0] * 7,
        entropies=[0.0] * 7,
        reward=reward,
        group_id=0,
        traj_id=0,
        turn_spans=[(0, 2), (3, 5), (6, 7)],
        info={"turn_rewards": [0.2, 0.0, 0.4]},
    )


def test_reinforce_pp_gets_each_turns_env_reward_at_its_last_token():
    # {success: 1, score: 0.5}, won: R = 1.3. Token rewards: .5 * .2 = .1 at position 1 (turn 0's
    # last token), 0 at position 4, and R - .1 - 0 = 1.2 at position 6 (sum still R).
    cfg = config("reinforce_plus_plus", {"success": 1.0, "score": 0.5}, gamma=0.5)
    _, _, returns = compute_advantages([episode()], cfg)
    # G (gamma .5, env tokens skipped): t6 1.2, t4 .6, t3 .3, t1 .1 + .15 = .25, t0 .125
    torch.testing.assert_close(returns[0], torch.tensor([0.125, 0.25, 0.0, 0.3, 0.6, 0.0, 1.2]))
    # no `score` term: the env's rewards are not part of the reward; R stays on the last token
    _, _, plain = compute_advantages([episode()], config("reinforce_plus_plus", {"success": 1.0}, gamma=0.5))
    torch.testing.assert_close(plain[0], torch.tensor([0.08125, 0.1625, 0.0, 0.325, 0.65, 0.0, 1.3]))


def test_gae_gets_each_turns_env_reward_at_its_last_token():
    cfg = config("gae", {"success": 1.0, "score": 0.5}, gamma=1.0, lam=0.5, whiten=False)
    values = [torch.tensor([0.5, 0.4, 99.0, 0.3, 0.6, -99.0, 0.9])]  # env tokens: ignored
    rows, _, returns = compute_advantages([episode()], cfg, values=values)
    # rewards (0, .1, -, 0, 0, -, 1.2); delta_t = r_t + V_next - V_t, A_t = delta_t + .5 A_next
    # t6: 1.2 - .9 = .3 | t4: .9 - .6 = .3, A .45 | t3: .6 - .3 = .3, A .525
    # t1: .1 + .3 - .4 = 0, A .2625 | t0: .4 - .5 = -.1, A .03125
    expected = torch.tensor([0.03125, 0.2625, 0.0, 0.525, 0.45, 0.0, 0.3])
    torch.testing.assert_close(rows[0], expected)
    torch.testing.assert_close(returns[0], torch.tensor([0.53125, 0.6625, 0.0, 0.825, 1.05, 0.0, 1.2]))


def test_step_mode_rows_get_their_return_from_their_turn_on():
    # One episode in step mode, env rewards (.2, .4), {success: 1, score: .5}, won: R = 1.3,
    # r = (.1, 1.2). Row 0's last token: .1 + 1.2 = 1.3; row 1's: 1.2 (R - .5 * .2): the reward
    # received before turn 1 is no credit of turn 1's action.
    samples = [step(0, 0, 1.3, 0.2, mask=(1, 1)), step(0, 1, 1.3, 0.4, mask=(1,))]
    cfg = config("reinforce_plus_plus", {"success": 1.0, "score": 0.5}, gamma=1.0)
    _, _, returns = compute_advantages(samples, cfg)
    torch.testing.assert_close(returns[0], torch.tensor([1.3, 1.3]))
    torch.testing.assert_close(returns[1], torch.tensor([1.2]))


def test_trajectory_mode_needs_turn_rewards_when_the_reward_weighs_them():
    sample = episode()
    sample.info = {}
    with pytest.raises(ValueError, match="turn_rewards"):
        compute_advantages([sample], config("reinforce_plus_plus", {"score": 1.0}))


# -- step-wise tree credit ---------------------------------------------------------------------------


def branched_steps():
    """One group, four episodes (Dr.GRPO over leaves: R = (1, 0, .5, 1), mean .625,
    A = (.375, -.625, -.125, .375)):
    A (traj 0) plays turns 0, 1, 2;
    B (traj 1) branches from A at turn 1 (a turn-level fork): it shares A's turn 0;
    C (traj 2) branches from B at turn 2 after B's first token (a token-level fork): it shares
      A's turn 0, B's turn 1 and B's turn-2 token 0 (its own turn-2 row has loss_mask 0 there);
    D (traj 3) is a one-turn root."""
    return [
        step(0, 0, 1.0, 0.0, mask=(1, 1, 1)),
        step(0, 1, 1.0, 0.0, mask=(1, 1)),
        step(0, 2, 1.0, 0.0, mask=(1,)),
        step(1, 1, 0.0, 0.0, mask=(1, 1, 1), parent=0, fork=1),
        step(1, 2, 0.0, 0.0, mask=(1, 1, 1), parent=0, fork=1),
        step(2, 2, 0.5, 0.0, mask=(0, 1, 1), parent=1, fork=2),
        step(3, 0, 1.0, 0.0, mask=(1, 1, 1)),
    ]


A_A, A_B, A_C, A_D = 0.375, -0.625, -0.125, 0.375


def test_step_mode_tree_soft_credits_shared_turns_with_every_leaf():
    rows, metrics, _ = compute_advantages(branched_steps(), config("grpo_tree", norm_by_std=False))
    ABC, BC = A_A + A_B + A_C, A_B + A_C  # soft: the sum over the leaves containing the token
    expected = [
        [ABC, ABC, ABC],  # A's turn 0: played by A, B, C
        [A_A, A_A],  # A's turn 1: A only (B re-played turn 1)
        [A_A],
        [BC, BC, BC],  # B's turn 1: B and C
        [BC, A_B, A_B],  # B's turn 2: token 0 is C's prefix too
        [0.0, A_C, A_C],  # C's turn 2: its shared token is B's sample, not trained here
        [A_D, A_D, A_D],
    ]
    for row, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(row, torch.tensor(want))
    assert metrics["adv/shared_turn_frac"] == pytest.approx(7 / 17)  # 3 + 3 + 1 of 17 tokens


def test_step_mode_tree_hard_averages_over_the_leaves():
    rows, _, _ = compute_advantages(
        branched_steps(), config("grpo_tree", norm_by_std=False, attribution="hard")
    )
    abc, bc = (A_A + A_B + A_C) / 3, (A_B + A_C) / 2
    assert rows[0].tolist() == pytest.approx([abc] * 3)
    assert rows[3].tolist() == pytest.approx([bc] * 3)
    assert rows[4].tolist() == pytest.approx([bc, A_B, A_B])
    assert rows[5].tolist() == pytest.approx([0.0, A_C, A_C])


def test_step_mode_without_branches_counts_each_episode_once():
    # grpo_tree over unbranched step rows: leaves = episodes (count="trajectory"). Episode 0 has
    # three turns: counted per sample the mean would be (3 * 1 + 0) / 4 = .75, per episode .5.
    samples = [step(0, k, 1.0, 0.0) for k in range(3)] + [step(1, 0, 0.0, 0.0)]
    rows, _, _ = compute_advantages(samples, config("grpo_tree", norm_by_std=False))
    assert row_values(rows) == pytest.approx([0.5, 0.5, 0.5, -0.5])


def _step_tree(**kw):
    base = dict(
        rewards=torch.tensor([1.0, 0.0, 0.5]),
        group_ids=torch.tensor([0, 0, 0]),
        traj_ids=torch.tensor([0, 1, 2]),
        loss_mask=torch.tensor([[1.0, 1, 1], [1, 1, 1], [0, 1, 1]]),
        turn_idx=torch.tensor([0, 1, 1]),
        parent_ids=torch.tensor([-1, 0, 1]),
        fork_turns=torch.tensor([0, 1, 1]),
        fork_positions=torch.tensor([0, 0, 1]),
    )
    base.update(kw)
    return AdvantageInputs(**base)


def test_step_mode_tree_rejects_bad_trees():
    tree = ADVANTAGES.build("grpo_tree")
    tree(_step_tree())  # the base tree is fine
    # episode 2 token-forks episode 1's turn 2, but episode 1 has no turn-2 sample
    with pytest.raises(ValueError, match="has no sample of turn 2"):
        tree(_step_tree(turn_idx=torch.tensor([0, 1, 2]), fork_turns=torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="before its fork turn"):
        tree(_step_tree(turn_idx=torch.tensor([0, 0, 1])))
    with pytest.raises(ValueError, match="shared prefix"):
        tree(_step_tree(loss_mask=torch.ones(3, 3)))
    with pytest.raises(ValueError, match="not a traj_id"):
        tree(_step_tree(parent_ids=torch.tensor([-1, 0, 7])))
    with pytest.raises(ValueError, match="cycle"):
        tree(_step_tree(parent_ids=torch.tensor([2, 0, 1])))
    with pytest.raises(ValueError, match="another group"):
        tree(_step_tree(group_ids=torch.tensor([0, 1, 1])))


def test_step_mode_tree_leaves_masked_tokens_at_zero():
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]])
    for params in ({}, {"attribution": "hard"}, {"attribution": "hard", "dedup_prefix": True}):
        out = ADVANTAGES.build("grpo_tree", params)(_step_tree(loss_mask=mask))
        assert (out.advantages[mask == 0] == 0).all()
        assert out.loss_mask is None  # step-wise shared turns are single rows already


# -- EPO nested mean ---------------------------------------------------------------------------------


def _epo_inputs(entropy, mask, traj_ids):
    entropy = torch.tensor(entropy)
    zeros = torch.zeros_like(entropy)
    return LossInputs(
        logprobs=zeros,
        old_logprobs=zeros,
        advantages=zeros,
        loss_mask=torch.tensor(mask, dtype=torch.float32),
        entropy=entropy,
        traj_ids=torch.tensor(traj_ids),
    )


# The same two episodes laid out as trajectory-mode rows (turns split by an env token) and as
# step-wise rows (one per turn). Episode 5: turns with entropies (1, 3) and (4); episode 7: one
# turn (2, 2, 8). Nested mean: ((2 + 4) / 2 + 12 / 3) / 2 = 3.5; token mean 20 / 6.
TRAJECTORY_ROWS = _epo_inputs(
    [[1.0, 3.0, 9.0, 4.0], [2.0, 2.0, 8.0, 7.0]], [[1, 1, 0, 1], [1, 1, 1, 0]], [5, 7]
)
STEP_ROWS = _epo_inputs(
    [[1.0, 3.0, 9.0], [4.0, 0.0, 0.0], [2.0, 2.0, 8.0]], [[1, 1, 0], [1, 0, 0], [1, 1, 1]], [5, 5, 7]
)


@pytest.mark.parametrize("inputs", [TRAJECTORY_ROWS, STEP_ROWS], ids=["trajectory", "step"])
def test_epo_nested_mean_trajectory_turn_token(inputs):
    nested = REGULARIZERS.build("epo", {"coef": 1.0, "alpha": 0.5, "aggregation": "nested"})
    assert "traj_ids" in nested.needs
    term = lambda fn, **kw: aggregate(fn(inputs, **kw).per_token_loss, inputs.loss_mask, "token-mean")  # noqa: E731
    assert float(term(nested)) == pytest.approx(-3.5)
    plain = REGULARIZERS.build("epo", {"coef": 1.0, "alpha": 0.5})
    assert float(term(plain)) == pytest.approx(-20 / 6)  # today's token mean, unchanged
    # with the hinge on (Href 1, kappa_r 2, beta 1): P = relu(H - 2), l = -(H - .5 P):
    # episode 5: turns (-1, -2.5) and (-3) -> -2.375; episode 7: (-2, -2, -5) -> -3
    assert float(term(nested, entropy_ref=1.0, beta=1.0)) == pytest.approx((-2.375 - 3) / 2)


def test_epo_nested_needs_traj_ids():
    inputs = _epo_inputs([[1.0, 2.0]], [[1, 1]], [0])
    inputs.traj_ids = None
    with pytest.raises(ValueError, match="traj_ids"):
        REGULARIZERS.build("epo", {"aggregation": "nested"})(inputs)


# -- RLOO needs groups ---------------------------------------------------------------------------------


def test_rloo_with_a_group_of_one_fails_when_the_config_loads():
    assert ADVANTAGES.get("rloo").flags["min_group_size"] == 2
    with pytest.raises(ConfigError, match=r"algo.group_size=1 with algo.advantage.name=rloo"):
        load(None, ["algo.advantage.name=rloo", "algo.group_size=1"])
    with pytest.raises(ConfigError, match="algo.group_size"):
        load("configs/algo/rloo.yaml", ["algo.group_size=1"])
    assert load(None, ["algo.advantage.name=rloo", "algo.group_size=2"]).algo.group_size == 2
    assert load(None, ["algo.advantage.name=grpo", "algo.group_size=1"]).algo.group_size == 1  # A = R
