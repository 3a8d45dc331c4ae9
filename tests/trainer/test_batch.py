"""Trajectories -> micro-batches: budgets, layouts that agree through a real model, scatter, targets.

Every layout (packed or padded rows, shared prompts or not) must give each sample the logprobs
it gets when run alone as one plain sequence; that is what makes the layouts interchangeable.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_batch.py -q
"""

import random

import pytest
import torch

from agents.types import Trajectory
from tests.conftest import build_tiny_llama
from trainer.batch import make_micro_batch, plan_by_prompt, plan_micro_batches

VOCAB = 64
LAYOUTS = [(pack, share) for pack in (True, False) for share in (True, False)]


def trajectory(prompt_ids, response_ids, loss_mask, traj_id=0):
    n = len(response_ids)
    logprobs = [-0.5 * m for m in loss_mask]
    return Trajectory(
        list(prompt_ids), list(response_ids), list(loss_mask), logprobs, [0.0] * n, 1.0, 0, traj_id
    )


def random_samples(n: int, seed: int, prompts: int | None = None) -> list[Trajectory]:
    """Samples of different lengths whose responses mix sampled (1) and env (0) tokens; with
    `prompts`, they draw from that many distinct prompts (GRPO groups share prompts)."""
    rng = random.Random(seed)
    pool = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))] for _ in range(prompts or n)]
    samples = []
    for k in range(n):
        prompt = pool[k % len(pool)]
        response = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        mask = [1] + [rng.choice([0, 1]) for _ in response[1:]]
        samples.append(trajectory(prompt, response, mask, traj_id=k))
    return samples


def advantages_for(samples):
    return [
        torch.arange(1, len(s.response_ids) + 1, dtype=torch.float) * (i + 1) for i, s in enumerate(samples)
    ]


# -- planning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_plan_respects_budget_and_covers_every_index_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
    budget = rng.choice([16, 50, 100, 1000])
    plan = plan_micro_batches(lengths, budget)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    for mb in plan:
        assert mb, "empty micro-batch"
        assert sum(lengths[i] for i in mb) <= budget or len(mb) == 1  # only an oversized item overflows


def test_plan_hand_example():
    # first-fit decreasing over 7, 5, 4, 3, 1 with budget 10: [7, 3] and [5, 4, 1]
    assert plan_micro_batches([5, 7, 3, 4, 1], 10) == [[1, 2], [0, 3, 4]]
    assert plan_micro_batches([30, 2], 10) == [[0], [1]]
    assert plan_micro_batches([], 10) == []


@pytest.mark.parametrize("share", [True, False])
def test_plan_by_prompt_keeps_prompt_groups_whole(share):
    samples = random_samples(12, seed=4, prompts=3)
    keep = [0, 1, 2, 4, 5, 7, 8, 9, 11]
    plan = plan_by_prompt(samples, keep, token_budget=30, share_prefix=share)
    assert sorted(i for mb in plan for i in mb) == keep
    if share:  # a prompt never spans two micro-batches
        where = {tuple(samples[i].prompt_ids): k for k, mb in enumerate(plan) for i in mb}
        assert all(where[tuple(samples[i].prompt_ids)] == k for k, mb in enumerate(plan) for i in mb)


# -- targets and scatter ---------------------------------------------------------------------------


@pytest.mark.parametrize("pack, share", LAYOUTS)
def test_targets_are_exactly_the_sampled_tokens(pack, share):
    samples = random_samples(6, seed=1, prompts=3)
    index = [4, 0, 2, 1]
    micro = make_micro_batch(samples, advantages_for(samples), index, pack=pack, share_prefix=share)
    rows, cols = micro.target_rows, micro.target_cols
    # every target sits on a loss_mask == 1 position and every such position is a target, once
    assert bool((micro.loss_mask[rows, cols] == 1).all())
    assert len(rows) == int(micro.loss_mask.sum())
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == len(rows)
    for row, col, tid in zip(rows.tolist(), cols.tolist(), micro.target_ids.tolist(), strict=True):
        assert tid == samples[index[row]].response_ids[col]
    if not share:  # one sequence per sample: the logits at a target position predict the next input
        assert torch.equal(micro.input_ids.flatten()[micro.target_positions + 1], micro.target_ids)
    # per-row tensors follow the order of `index`, zero beyond each response
    for row, i in enumerate(index):
        n = len(samples[i].response_ids)
        assert micro.loss_mask[row, :n].tolist() == [float(m) for m in samples[i].loss_mask]
        assert torch.equal(micro.advantages[row, :n], advantages_for(samples)[i])
        assert not micro.advantages[row, n:].any() and not micro.loss_mask[row, n:].any()
    assert micro.sample_index == index


def test_scatter_puts_values_at_row_and_col():
    samples = [trajectory([5, 6], [7, 8, 9], [1, 0, 1]), trajectory([5], [10, 11], [0, 1])]
    micro = make_micro_batch(samples, advantages_for(samples), [0, 1], pack=True, share_prefix=False)
    assert micro.target_rows.tolist() == [0, 0, 1] and micro.target_cols.tolist() == [0, 2, 1]
    # packed row [5 6 7 8 9 | 5 10 11]: the logits at 1 predict 7, at 3 predict 9, at 6 predict 11
    assert micro.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 10, 11]]
    assert micro.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert micro.target_positions.tolist() == [1, 3, 6]
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = micro.scatter(values)
    assert out.tolist() == [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]
    out.sum().backward()  # keeps autograd
    assert values.grad.tolist() == [1.0, 1.0, 1.0]


def test_shared_prompt_runs_once():
    samples = [trajectory([5, 6], [7, 8], [1, 1]), trajectory([5, 6], [9], [1])]
    micro = make_micro_batch(samples, advantages_for(samples), [0, 1], pack=True, share_prefix=True)
    assert micro.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert micro.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the 2nd response restarts after the prompt
    assert micro.target_positions.tolist() == [1, 2, 1]  # both first tokens predicted by the prompt's end
    assert micro.num_tokens == 5
    seen = micro.attention_mask[0, 0]
    assert seen[4].tolist() == [True, True, False, False, True]  # response 2 sees the prompt and itself


# -- every layout == each sample alone, through a real model ----------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_llama(VOCAB, seed=0).eval()


def micro_logprobs(model, micro) -> torch.Tensor:
    """[B, T] logprobs of the target tokens, from one forward over the micro-batch."""
    logits = model(
        input_ids=micro.input_ids,
        position_ids=micro.position_ids,
        attention_mask=micro.attention_mask,
        use_cache=False,
    ).logits
    flat = logits.reshape(-1, logits.shape[-1])[micro.target_positions].log_softmax(-1)
    return micro.scatter(flat.gather(-1, micro.target_ids[:, None]).squeeze(-1))


def alone_logprobs(model, sample) -> torch.Tensor:
    """[T] logprobs of the response tokens with the sample run alone (plain causal sequence)."""
    seq = torch.tensor([sample.prompt_ids + sample.response_ids])
    logp = model(input_ids=seq, use_cache=False).logits[0].log_softmax(-1)
    p = len(sample.prompt_ids)
    resp = torch.tensor(sample.response_ids)
    out = logp[p - 1 : p - 1 + len(resp)].gather(-1, resp[:, None]).squeeze(-1)
    return out * torch.tensor(sample.loss_mask, dtype=torch.float)


@pytest.mark.parametrize("pack, share", LAYOUTS)
def test_layouts_give_each_sample_its_own_logprobs(tiny_llama, pack, share):
    samples = random_samples(7, seed=2, prompts=3)
    index = [6, 0, 3, 1, 5]  # prompts 0, 0, 0, 1, 2: one shared by three samples
    with torch.no_grad():
        got = micro_logprobs(
            tiny_llama, make_micro_batch(samples, advantages_for(samples), index, pack, share)
        )
        for row, i in enumerate(index):
            n = len(samples[i].response_ids)
            torch.testing.assert_close(
                got[row, :n], alone_logprobs(tiny_llama, samples[i]), atol=2e-5, rtol=1e-5
            )
            assert not got[row, n:].any()


def test_shared_prompt_gradient_is_the_sum_over_samples(tiny_llama):
    """The prompt runs once, but the gradient equals that of the separate sequences."""
    samples = random_samples(4, seed=5, prompts=1)
    adv = advantages_for(samples)

    def grads(share: bool) -> list[torch.Tensor]:
        tiny_llama.zero_grad()
        micro_logprobs(
            tiny_llama, make_micro_batch(samples, adv, [0, 1, 2, 3], False, share)
        ).sum().backward()
        return [p.grad.clone() for p in tiny_llama.parameters()]

    for shared, separate in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(shared, separate, atol=1e-5, rtol=1e-4)
    tiny_llama.zero_grad()
