"""Advantage estimators against hand-computed values. Run: pytest tests/trainer/test_advantages.py"""

import math

import pytest
import torch

from trainer.advantages import ADVANTAGES, AdvantageInputs


def _inputs(rewards, group_ids, traj_ids=None, loss_mask=None, **kw):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    B = len(rewards)
    if traj_ids is None:
        traj_ids = list(range(B))
    if loss_mask is None:
        loss_mask = torch.ones(B, 3)
    return AdvantageInputs(
        rewards=rewards,
        group_ids=torch.tensor(group_ids),
        traj_ids=torch.tensor(traj_ids),
        loss_mask=torch.as_tensor(loss_mask, dtype=torch.float32),
        **kw,
    )


def _per_sample(out):
    return out.advantages[:, 0]


def test_grpo_one_group_hand_values():
    # mean 0.5; unbiased std sqrt((4 * 0.25) / 3) = 0.57735; A = +-0.5 / 0.57735 = +-0.866025
    out = ADVANTAGES.build("grpo")(_inputs([1, 0, 0, 1], [0, 0, 0, 0]))
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025])
    torch.testing.assert_close(_per_sample(out), expected, atol=1e-5, rtol=0)
    assert (out.advantages == out.advantages[:, :1]).all()  # broadcast over tokens
    assert out.returns is None and "adv/mean" in out.metrics


def test_dr_grpo_no_std():
    out = ADVANTAGES.build("grpo", {"norm_by_std": False})(_inputs([1, 0, 0, 1], [0, 0, 0, 0]))
    torch.testing.assert_close(_per_sample(out), torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_grpo_group_of_one_is_reward_and_groups_are_separate():
    # group 0: [1, 0] -> mean .5, std .7071 -> +-.7071; group 1: a single sample -> A = R = 3
    out = ADVANTAGES.build("grpo")(_inputs([1, 0, 3], [0, 0, 1]))
    torch.testing.assert_close(_per_sample(out), torch.tensor([0.707106, -0.707106, 3.0]), atol=1e-5, rtol=0)
    assert out.metrics["adv/singleton_frac"] == pytest.approx(1 / 3)


def test_grpo_all_equal_rewards_give_zero():
    out = ADVANTAGES.build("grpo")(_inputs([0.7, 0.7, 0.7], [5, 5, 5]))
    assert torch.count_nonzero(out.advantages) == 0
    assert out.metrics["adv/zero_std_frac"] == 1.0


def test_masked_tokens_stay_zero():
    mask = [[1, 1, 0, 0], [0, 1, 1, 0]]
    out = ADVANTAGES.build("grpo")(_inputs([1, 0], [0, 0], loss_mask=mask))
    a = 0.707106
    torch.testing.assert_close(
        out.advantages, torch.tensor([[a, a, 0, 0], [0, -a, -a, 0]]), atol=1e-5, rtol=0
    )


def test_grpo_count_trajectory_differs_from_sample():
    # one group; episode 7 has 3 turn-samples (reward 1), episode 8 has one (reward 0)
    inputs = _inputs([1, 1, 1, 0], [0, 0, 0, 0], traj_ids=[7, 7, 7, 8])
    # sample: mean .75, std sqrt((3 * .0625 + .5625) / 3) = .5 -> [.5, .5, .5, -1.5]
    by_sample = ADVANTAGES.build("grpo", {"count": "sample"})(inputs)
    torch.testing.assert_close(_per_sample(by_sample), torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0)
    # trajectory: units [1, 0] -> mean .5, std .7071 -> [.7071] * 3 + [-.7071]
    by_traj = ADVANTAGES.build("grpo", {"count": "trajectory"})(inputs)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(_per_sample(by_traj), torch.tensor([a, a, a, -a]), atol=1e-5, rtol=0)


def test_count_trajectory_rejects_traj_spanning_groups():
    with pytest.raises(ValueError, match="single group"):
        ADVANTAGES.build("grpo", {"count": "trajectory"})(_inputs([1, 0], [0, 1], traj_ids=[3, 3]))


def test_rloo_hand_values_and_singleton():
    # R=1: others [0,0,1] mean 1/3 -> 2/3; R=0: others [1,0,1] mean 2/3 -> -2/3; single group -> 0
    out = ADVANTAGES.build("rloo")(_inputs([1, 0, 0, 1, 5], [0, 0, 0, 0, 1]))
    torch.testing.assert_close(
        _per_sample(out), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]), atol=1e-6, rtol=0
    )
    assert out.metrics["adv/singleton_frac"] == pytest.approx(0.2)


def test_input_shape_errors_name_the_field():
    with pytest.raises(ValueError, match="group_ids"):
        AdvantageInputs(torch.zeros(2), torch.zeros(3, dtype=torch.long), torch.zeros(2), torch.ones(2, 3))


def test_reinforce_plus_plus_returns_skip_masked_tokens_and_whiten():
    # mask [1,1,0,1], rewards [0,1,5,2] (the 5 sits on an env token: ignored), gamma .5
    # G: t3 = 2; t1 = 1 + .5*2 = 2; t0 = 0 + .5*2 = 1 -> [1, 2, 0, 2]
    # valid G [1,2,2]: mean 5/3, unbiased var 1/3 -> A = (G - 5/3) * sqrt(3)
    inputs = _inputs([0.0], [0], loss_mask=[[1, 1, 0, 1]], token_rewards=torch.tensor([[0.0, 1.0, 5.0, 2.0]]))
    out = ADVANTAGES.build("reinforce_plus_plus", {"gamma": 0.5})(inputs)
    torch.testing.assert_close(out.returns, torch.tensor([[1.0, 2.0, 0.0, 2.0]]))
    s3 = math.sqrt(3)
    torch.testing.assert_close(
        out.advantages, torch.tensor([[-2 / 3 * s3, s3 / 3, 0.0, s3 / 3]]), atol=1e-5, rtol=0
    )


def test_reinforce_plus_plus_baseline_hand_values():
    # group 0: [1, 0] -> centred [.5, -.5]; group 1 single -> 3 (mean 0)
    # tokens: row0 two valid (.5, .5), row1 one (-.5), row2 one (3): mean .875
    # unbiased var (2 * .375^2 + 1.375^2 + 2.125^2) / 3 = 6.6875 / 3
    mask = [[1, 1], [1, 0], [0, 1]]
    out = ADVANTAGES.build("reinforce_plus_plus_baseline")(_inputs([1, 0, 3], [0, 0, 1], loss_mask=mask))
    std = math.sqrt(6.6875 / 3)
    a, b, c = -0.375 / std, -1.375 / std, 2.125 / std
    torch.testing.assert_close(out.advantages, torch.tensor([[a, a], [b, 0], [0, c]]), atol=1e-5, rtol=0)


def test_gae_skips_masked_tokens():
    # mask [1,0,1], V [.5, 9 (env token), .25], reward 1 on the last sampled token, gamma .9, lam .8
    # t2: delta = 1 + 0 - .25 = .75 -> A = .75; t1 skipped (next value stays .25)
    # t0: delta = 0 + .9*.25 - .5 = -.275 -> A = -.275 + .72*.75 = .265; returns = A + V
    params = {"gamma": 0.9, "lam": 0.8, "whiten": False}
    values = torch.tensor([[0.5, 9.0, 0.25]])
    out = ADVANTAGES.build("gae", params)(_inputs([1.0], [0], loss_mask=[[1, 0, 1]], values=values))
    torch.testing.assert_close(out.advantages, torch.tensor([[0.265, 0.0, 0.75]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.765, 0.0, 1.0]]))
    values2 = torch.tensor([[0.5, -123.0, 0.25]])  # changing the env token's value changes nothing
    out2 = ADVANTAGES.build("gae", params)(_inputs([1.0], [0], loss_mask=[[1, 0, 1]], values=values2))
    torch.testing.assert_close(out2.advantages, out.advantages)
    with pytest.raises(ValueError, match="values"):
        ADVANTAGES.build("gae")(_inputs([1.0], [0]))


def test_gigpo_hand_values():
    # group 0: episode 0 (return 1) turns 0/1 with anchors A/B and step rewards 0/1;
    #          episode 1 (return 0) turns 0/1 with anchors A/C, step rewards 0/0.
    # group 1: one sample with anchor A (a different group: not grouped with the others).
    # A^E (mean_norm): [.5, .5, -.5, -.5 | 2 (singleton group: A = R)]
    # step returns (gamma .5): ep0: t1 = 1, t0 = .5; ep1: 0, 0.  Anchor (0, A): [.5, 0] -> +-.25
    # B, C and (1, A) are singletons -> 0.   Samples listed out of turn order on purpose.
    inputs = _inputs(
        [1, 1, 0, 0, 2],
        [0, 0, 0, 0, 1],
        traj_ids=[0, 0, 1, 1, 9],
        turn_idx=torch.tensor([1, 0, 0, 1, 0]),
        step_rewards=torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0]),
        anchor_keys=["B", "A", "A", "C", "A"],
    )
    out = ADVANTAGES.build("gigpo", {"gamma": 0.5})(inputs)
    torch.testing.assert_close(_per_sample(out), torch.tensor([0.5, 0.75, -0.75, -0.5, 2.0]))
    assert out.metrics["adv/anchor_grouped_frac"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="anchor_keys"):
        ADVANTAGES.build("gigpo")(_inputs([1, 0], [0, 0]))


def _tree_inputs(**kw):
    # rows 10 <- 11 <- 12 (traj ids); 11 copies 10's tokens [0, 2), 12 copies 11's tokens [0, 3)
    # owner of each token: row0 [0,0,0,0]; row1 [0,0,1,1]; row2 [0,0,1,2]
    return _inputs(
        [1, 1, 0],
        [0, 0, 0],
        traj_ids=[10, 11, 12],
        loss_mask=torch.ones(3, 4),
        parent_ids=torch.tensor([-1, 10, 11]),
        fork_positions=torch.tensor([0, 2, 3]),
        **kw,
    )


def test_grpo_tree_soft_is_plain_grpo_per_leaf():
    # Dr.GRPO: mean 2/3 -> A = [1/3, 1/3, -2/3] on every token of each leaf
    inputs = _tree_inputs()
    out = ADVANTAGES.build("grpo_tree", {"norm_by_std": False})(inputs)
    plain = ADVANTAGES.build("grpo", {"norm_by_std": False})(inputs)
    torch.testing.assert_close(out.advantages, plain.advantages)
    assert out.loss_mask is None
    assert out.metrics["adv/shared_prefix_frac"] == pytest.approx(5 / 12)  # 2 + 3 copied tokens


def test_grpo_tree_hard_and_dedup():
    a, b = 1 / 3, -1 / 6  # b: node (row1, t2) is shared by rows 1, 2: (1/3 - 2/3) / 2
    hard = ADVANTAGES.build("grpo_tree", {"norm_by_std": False, "attribution": "hard"})(_tree_inputs())
    # tokens 0, 1 are shared by all three leaves: mean of a zero-mean group = 0
    expected = torch.tensor([[0, 0, a, a], [0, 0, b, a], [0, 0, b, -2 / 3]])
    torch.testing.assert_close(hard.advantages, expected, atol=1e-6, rtol=0)
    dedup = ADVANTAGES.build("grpo_tree", {"norm_by_std": False, "attribution": "hard", "dedup_prefix": True})
    out = dedup(_tree_inputs())
    # each shared token is trained once, on its owner row; copies leave the loss mask
    keep = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=torch.float32)
    torch.testing.assert_close(out.loss_mask, keep)
    torch.testing.assert_close(out.advantages, expected * keep, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="dedup_prefix needs attribution='hard'"):
        ADVANTAGES.build("grpo_tree", {"dedup_prefix": True})(_tree_inputs())


def test_grpo_tree_rejects_bad_trees():
    def bad(parents, forks=(0, 2, 3), groups=(0, 0, 0)):
        inputs = _inputs([1, 1, 0], list(groups), traj_ids=[10, 11, 12], loss_mask=torch.ones(3, 4))
        inputs.parent_ids, inputs.fork_positions = torch.tensor(parents), torch.tensor(forks)
        return ADVANTAGES.build("grpo_tree")(inputs)

    with pytest.raises(ValueError, match="not a traj_id"):
        bad([-1, 99, 11])
    with pytest.raises(ValueError, match="cycle"):
        bad([12, 10, 11])
    with pytest.raises(ValueError, match="another group"):
        bad([-1, 10, 11], groups=(0, 1, 1))
    with pytest.raises(ValueError, match="fork_positions"):
        bad([-1, 10, 11], forks=(0, 9, 3))


def test_empg_hand_values():
    # trajectory 0: turns 0, 1 (entropy 0, 1); trajectory 1: one turn (entropy .5). Dr.GRPO counted
    # per trajectory: A = [.5, .5, -.5]. H~ = [0, 1, .5] (eps 0); e = exp(-H~) = [1, .3679, .6065],
    # mean .6581 -> g = [1.5194, .5590, .9216]; future bonus only on turn 0: .05 exp(-1) = .01839
    # A_mod = [.7781, .2795, -.4608], minus its mean .1989 -> [.5792, .0806, -.6597]
    entropies = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5]])
    inputs = _inputs(
        [1, 1, 0], [0, 0, 0], traj_ids=[0, 0, 1], entropies=entropies, turn_idx=torch.tensor([0, 1, 0])
    )
    out = ADVANTAGES.build("empg", {"eps": 0.0, "norm_by_std": False, "count": "trajectory"})(inputs)
    torch.testing.assert_close(
        _per_sample(out), torch.tensor([0.579179, 0.080550, -0.659729]), atol=1e-5, rtol=0
    )
    assert _per_sample(out).sum().abs() < 1e-6  # zero-mean over the batch's samples


def test_empg_all_equal_entropy_and_single_turn():
    # equal entropies: g = 1 and H~ = 0; without turn_idx no bonus -> plain GRPO minus its mean (0)
    inputs = _inputs([1, 0], [0, 0], entropies=torch.ones(2, 3))
    out = ADVANTAGES.build("empg")(inputs)
    torch.testing.assert_close(out.advantages, ADVANTAGES.build("grpo")(inputs).advantages)
    with pytest.raises(ValueError, match="entropies"):
        ADVANTAGES.build("empg")(_inputs([1, 0], [0, 0]))


def test_ettrl_reshape_and_clip():
    # A = [.5, -.5]; mean entropies [1, 3], group mean 2 -> Y = [1.5, .5] -> [.75, -.25]
    entropies = torch.tensor([[1.0, 1, 1], [3, 3, 3]])
    out = ADVANTAGES.build("ettrl", {"norm_by_std": False})(_inputs([1, 0], [0, 0], entropies=entropies))
    torch.testing.assert_close(_per_sample(out), torch.tensor([0.75, -0.25]))
    # a group of one: Y = 1 (its own mean); Adv-Clip clips A = [.7071, -.7071, 3] to [-.5, .5]
    single = ADVANTAGES.build("ettrl")(_inputs([3], [0], entropies=torch.ones(1, 3)))
    torch.testing.assert_close(_per_sample(single), torch.tensor([3.0]))
    clipped = ADVANTAGES.build("ettrl", {"mode": "clip", "clip": 0.5})(_inputs([1, 0, 3], [0, 0, 1]))
    torch.testing.assert_close(_per_sample(clipped), torch.tensor([0.5, -0.5, 0.5]))
    assert not ADVANTAGES.build("ettrl", {"mode": "clip"}).needs


def test_aepo_entropy_aware_advantage():
    # A = [.5, -.5]; valid entropies [1, 3, 2, 2]: mean 2, unbiased std sqrt(2/3) -> z = [-1.2247, 1.2247, 0, 0]
    entropies = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    out = ADVANTAGES.build("aepo", {"norm_by_std": False})(
        _inputs([1, 0], [0, 0], loss_mask=torch.ones(2, 2), entropies=entropies)
    )
    z = 1 / math.sqrt(2 / 3)
    expected = torch.tensor([[0.5 * (1 - 0.2 * z), 0.5 * (1 + 0.2 * z)], [-0.5, -0.5]])
    torch.testing.assert_close(out.advantages, expected)
    # all-equal entropy: std 0 -> 1, z = 0: plain GRPO
    same = _inputs([1, 0], [0, 0], entropies=torch.ones(2, 3))
    torch.testing.assert_close(
        ADVANTAGES.build("aepo")(same).advantages, ADVANTAGES.build("grpo")(same).advantages
    )


def test_hapo_token_level_group_average():
    mask = torch.zeros(5, 27)
    mask[0, :3], mask[1, :1], mask[2, :2], mask[3, :1], mask[4, :26] = 1, 1, 1, 1, 1
    out = ADVANTAGES.build("hapo")(_inputs([1, 0, 2, 1, 0], [0, 0, 1, 2, 2], loss_mask=mask))
    # group 0, lengths [3, 1]: mu = 3/4, biased token var (3 * 1/16 + 9/16) / 4 = 3/16 -> sigma .4330
    #   A = [.25, -.75] / .4330 = [.5774, -1.7321]
    # group 1: one sample -> GRPO: A = R = 2
    # group 2, lengths [1, 26]: p = 1/27, A_0 = sqrt(26) = 5.099 >= 5 -> GRPO fallback [.7071, -.7071]
    expected = torch.tensor([0.577350, -1.732051, 2.0, 0.707107, -0.707107])
    torch.testing.assert_close(_per_sample(out), expected, atol=1e-5, rtol=0)
    assert out.metrics["adv/hapo_fallback_frac"] == pytest.approx(3 / 5)
    equal = ADVANTAGES.build("hapo")(_inputs([0.5, 0.5], [0, 0]))
    assert torch.count_nonzero(equal.advantages) == 0


def test_every_estimator_masking_invariant():
    """Values/rewards/entropies at masked positions change no advantage."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1

    def make(noise):
        junk = lambda: noise * torch.randn(4, 5, generator=g)  # noqa: E731
        where = lambda x: torch.where(mask > 0, x, junk())  # noqa: E731
        base = torch.arange(20.0).view(4, 5) / 10
        return _inputs(
            [1, 0, 2, 1],
            [0, 0, 1, 1],
            traj_ids=[0, 1, 2, 3],
            loss_mask=mask,
            values=where(base),
            token_rewards=where(base.flip(1)),
            entropies=where(base + 0.1).abs(),
            turn_idx=torch.tensor([0, 0, 0, 0]),
            step_rewards=torch.tensor([0.0, 1.0, 2.0, 1.0]),
            anchor_keys=[1, 2, 1, 1],
            parent_ids=torch.tensor([-1, 0, -1, 2]),
            fork_positions=torch.tensor([0, 2, 0, 1]),
        )

    for name in ADVANTAGES.names():
        for params in [{}, {"attribution": "hard", "dedup_prefix": True}] if name == "grpo_tree" else [{}]:
            fn = ADVANTAGES.build(name, params)
            x, y = make(0.0), make(100.0)
            if name == "grpo_tree":  # trajectory-mode rows; step-wise trees: tests/trainer/test_credit.py
                x.turn_idx = y.turn_idx = None
            a, b = fn(x), fn(y)
            torch.testing.assert_close(a.advantages, b.advantages, msg=name)
            assert (a.advantages[mask == 0] == 0).all(), name
