"""Token-level branching (CURE/ETMR, `rollout.branch.policy=token`) through the real rollout
loop on a real TextWorld game with a scripted engine: finished roots fork at their highest-
entropy eligible token, the env is cloned as it was before that turn (by replay), the branch
re-samples from the fork token on, and its records share the parent's prefix exactly.

Run: .venv/bin/python -m pytest tests/agents/test_token_branch.py -q
"""

import pytest

from agents.brancher import BranchConfig
from agents.config import RolloutConfig
from agents.engines.scripted import ScriptedEngine
from agents.rollout import Rollout
from tests.agents.test_rollout import GREEDY, policy, task

ETMR = BranchConfig("token", forks=1, continuations=1, token_choice="top")


class RisingEntropy(ScriptedEngine):
    """Entropy grows with the engine call, so a root's last turn holds its highest-entropy
    tokens (the fork lands on a later turn, with env steps to replay before it)."""

    def generate(self, prompts, sampling):
        out = super().generate(prompts, sampling)
        for result in out:
            result.entropies = [h + 0.1 * len(self.calls) for h in result.entropies]
        return out


def prefix_aware(reply):
    """A policy that, given a prompt ending in the first j tokens of the reply it would give,
    returns the rest: a branch re-sampled after its fork token plays like its parent."""

    def continue_reply(prompt, call):
        full = reply(prompt, call)
        for j in range(len(full) - 1, 0, -1):
            if prompt[-j:] == full[:j]:
                return full[j:]
        return full

    return continue_reply


@pytest.fixture(scope="module")
def games(game_cache):
    from environments.textworld_env import ensure_games

    return ensure_games([1], cache_dir=game_cache)


@pytest.fixture(scope="module")
def walkthroughs(games):
    from environments.textworld_env import TextWorldEnv

    env = TextWorldEnv(games[0], expose_walkthrough=True)
    _, info = env.reset()
    env.close()
    return {games[0]: info["walkthrough"]}


def look_look_win(tok, walkthroughs):
    """Two `look`s then the winning command, no EOS (the reply does not depend on the call's
    parity, so a branch's re-sampled turn can equal its parent's)."""
    winning = {w[0] for w in walkthroughs.values()}
    return policy(tok, lambda call: {"look"} if call < 2 else winning, eos_every_other=False)


def run(tok, reply, tasks, **cfg):
    engine = RisingEntropy(reply, eos_id=tok.eos_token_id)
    config = RolloutConfig(**{"max_new_tokens": 16, "max_turns": 6, "branch": ETMR, **cfg})
    return engine, Rollout(engine, tok, config).run(tasks, GREEDY)


@pytest.mark.parametrize("mode", ["trajectory", "step"])
def test_roots_fork_at_their_top_entropy_token(smol_tokenizer, games, walkthroughs, mode):
    tok = smol_tokenizer
    reply = prefix_aware(look_look_win(tok, walkthroughs))
    engine, result = run(tok, reply, [task(games[0])] * 4, mode=mode)
    episodes = result.episodes
    # budget 4 = 2 roots x (1 + 1 fork x 1 continuation)
    assert [ep["parent_id"] for ep in episodes] == [None, None, 0, 1]
    assert [ep["fork_turn"] for ep in episodes] == [None, None, 2, 2]  # the last turn: top entropy
    assert all(ep["won"] and ep["turns"] == 3 for ep in episodes)
    assert episodes[2]["actions"] == episodes[0]["actions"]
    # 3 rounds of roots, then one round of the 2 branches (their fork turn only)
    assert [len(call) for call in engine.calls] == [2, 2, 2, 2]
    m = result.metrics
    assert m["branch/per_group"] == 2.0 and m["branch/budget_used"] == 1.0
    assert m["branch/fork_entropy"] > m["branch/other_entropy"]
    assert m["branch/tokens_saved"] > 0
    if mode == "trajectory":
        samples = {s.traj_id: s for s in result.samples}
        for child, parent in ((2, 0), (3, 1)):
            c, p = samples[child], samples[parent]
            start = c.turn_spans[2][0]
            assert start < c.fork_token < c.turn_spans[2][1]  # inside the fork turn's reply
            assert c.response_ids == p.response_ids  # re-sampled as the parent did
            offset = c.fork_token - start
            # the engine saw the parent's turn-2 prompt and the first `offset` tokens of its reply
            prompt = engine.calls[3][child - 2]
            assert prompt == p.prompt_ids + p.response_ids[: c.fork_token]
            assert c.rollout_logprobs[: c.fork_token] == p.rollout_logprobs[: c.fork_token]
            # the head keeps the parent's statistics, the rest is the new call's
            assert c.rollout_logprobs[c.fork_token] == pytest.approx(-0.1) and offset > 0
    else:  # step mode: a branch emits its fork turn only, the parent's head masked out
        mine = [s for s in result.samples if s.parent_id is not None]
        assert sorted((s.traj_id, s.turn_idx) for s in mine) == [(2, 2), (3, 2)]
        parent_turn = next(s for s in result.samples if s.traj_id == 0 and s.turn_idx == 2)
        for s in mine:
            assert s.response_ids == parent_turn.response_ids
            head = s.loss_mask.index(1)
            assert head > 0 and s.loss_mask == [0] * head + [1] * (len(s.loss_mask) - head)
            assert s.rollout_logprobs[:head] == [0.0] * head and s.entropies[:head] == [0.0] * head


def test_cure_draws_among_the_top_k_and_refills_the_budget(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    cure = BranchConfig("token", forks=2, continuations=2, top_k=3, token_choice="random_top_k")
    reply = prefix_aware(look_look_win(tok, walkthroughs))
    # budget 6: 1 root x (1 + 2 x 2) = 5, one slot left for a fresh root after the forks
    _, result = run(tok, reply, [task(games[0])] * 6, mode="trajectory", branch=cure)
    parents = [ep["parent_id"] for ep in result.episodes]
    assert parents.count(None) == 2 and parents.count(0) == 4
    assert len(result.episodes) == 6 and result.metrics["branch/budget_used"] == 1.0
    forks = {s.fork_token for s in result.samples if s.parent_id is not None}
    assert len(forks) == 2  # two distinct fork points, two continuations each
