"""The multi-turn rollout loop (agents/rollout.py) on real TextWorld games with a scripted engine.

The scripted policy reads the numbered command list out of the prompt it was given, so it plays
the same actions in step and trajectory mode. Games are seeds 1..3 of the suite's game cache
(one-step quests). The last sections run the same loop through env worker processes and with the
expert agent (walkthroughs, no model), `entrorl eval ... agent=expert` included.

Run: .venv/bin/python -m pytest tests/agents/test_rollout.py -q
"""

import hashlib
import json
import re
import uuid
from pathlib import Path

import pytest

import environments
from agents.brancher import BranchConfig
from agents.chat import encode, render_prompt
from agents.config import RolloutConfig, SamplingConfig
from agents.engines.scripted import ScriptedEngine
from agents.prompts import NumberedChoice, Observation
from agents.rollout import Rollout, Task
from environments import TextEnv
from environments.textworld_env import TextWorldEnv, ensure_games

GREEDY = SamplingConfig(temperature=0.0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def games(game_cache):
    return ensure_games([1, 2, 3], cache_dir=game_cache)


@pytest.fixture(scope="module")
def walkthroughs(games):
    """The winning command of each game (every game here is a one-step quest)."""
    out = {}
    for game in games:
        env = TextWorldEnv(game, expose_walkthrough=True)
        _, info = env.reset()
        out[game] = info["walkthrough"]
        env.close()
    assert all(len(w) == 1 for w in out.values())
    return out


def task(game, group_id=0):
    return Task(env_id="textworld", group_id=group_id, env_kwargs={"admissible_commands": True},
                reset_options={"game_file": game})  # fmt: skip


def choices_in(tokenizer, prompt_ids):
    """The numbered command list of the last observation in a prompt."""
    text = tokenizer.decode(prompt_ids)
    block = text.rsplit("Valid commands:\n", 1)[1].split("\n\n", 1)[0]
    return [re.sub(r"^\d+\. ", "", line) for line in block.splitlines()]


def policy(tokenizer, wanted, eos_every_other=True):
    """reply(prompt, turn): the number of the first command in `wanted(turn)` on offer, closed by
    `</action>`; even turns also end with EOS (as a model that closes its turn), odd turns do not
    (as a reply cut by the stop string)."""

    def reply(prompt_ids, turn):
        choices = choices_in(tokenizer, prompt_ids)
        number = next(i for i, cmd in enumerate(choices, 1) if cmd in wanted(turn))
        ids = encode(tokenizer, f"{number}</action>")
        return ids + [tokenizer.eos_token_id] if eos_every_other and turn % 2 == 0 else ids

    return reply


def look_look_win(tokenizer, walkthroughs):
    """Two `look`s, then the winning command: three turns per episode."""
    winning = {w[0] for w in walkthroughs.values()}
    return policy(tokenizer, lambda turn: {"look"} if turn < 2 else winning)


def run(tokenizer, reply, tasks, **cfg):
    engine = ScriptedEngine(reply, eos_id=tokenizer.eos_token_id)
    config = RolloutConfig(**{"max_new_tokens": 16, "max_turns": 6, **cfg})
    return engine, Rollout(engine, tokenizer, config).run(tasks, GREEDY)


# -- token-exact records --------------------------------------------------------------------------


def test_trajectory_mode_is_token_exact(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    reply = look_look_win(tok, walkthroughs)
    engine, result = run(tok, reply, [task(g, i) for i, g in enumerate(games)], mode="trajectory")
    samples = sorted(result.samples, key=lambda s: s.traj_id)
    assert [s.traj_id for s in samples] == [0, 1, 2] and [s.group_id for s in samples] == [0, 1, 2]
    # one batched engine call per round, with every episode in it
    assert [len(batch) for batch in engine.calls] == [3, 3, 3]
    for sample in samples:
        assert sample.turn_idx is None and len(sample.turn_spans) == 3
        mask = [0] * len(sample.response_ids)
        for k, (start, end) in enumerate(sample.turn_spans):
            seen = engine.calls[k][sample.traj_id]
            # the token-exact rule: the prompt at turn k is the record's prefix, nothing re-rendered
            assert seen == sample.prompt_ids + sample.response_ids[:start]
            returned = reply(seen, k)
            assert sample.response_ids[start:end] == returned
            assert sample.rollout_logprobs[start:end] == [-0.1 * (j + 1) for j in range(len(returned))]
            assert sample.entropies[start:end] == [0.5 + 0.01 * j for j in range(len(returned))]
            mask[start:end] = [1] * (end - start)
        assert sample.loss_mask == mask  # 1 exactly on the engine's ids
        off = [i for i, m in enumerate(mask) if not m]
        assert off and all(sample.rollout_logprobs[i] == 0.0 == sample.entropies[i] for i in off)
        assert sample.turn_spans[-1][1] == len(sample.response_ids)  # the episode ends on a reply
        assert sample.stop_reason == "terminated" and sample.reward == 1.0
        assert sample.info["won"] and sample.info["turns"] == 3 and sample.info["parse_errors"] == 0
        assert sample.info["actions"] == ["look", "look", walkthroughs[games[sample.traj_id]][0]]


def test_trajectory_mode_observations_are_rendered_by_the_template(smol_tokenizer, games, walkthroughs):
    """Between two replies sit only template tokens and the next observation, prefill included."""
    tok = smol_tokenizer
    _, result = run(tok, look_look_win(tok, walkthroughs), [task(games[0])], mode="trajectory")
    (sample,) = result.samples
    (_, end0), (start1, _) = sample.turn_spans[:2]
    between = tok.decode(sample.response_ids[end0:start1])
    # turn 0 ended with EOS, so the delta starts on the newline after it
    assert between.startswith("\n<|im_start|>user\n")
    assert between.endswith("<|im_end|>\n<|im_start|>assistant\n<action>")
    assert "Valid commands:\n" in between and "Goal:" not in between
    (_, end1), (start2, _) = sample.turn_spans[1:3]
    # turn 1 was cut (no EOS), so the delta closes it first
    assert tok.decode(sample.response_ids[end1:start2]).startswith("<|im_end|>\n<|im_start|>user\n")

    # The whole record up to the last reply equals one render of the conversation, rebuilt by
    # replaying the actions in the game.
    fmt, env = NumberedChoice(), TextWorldEnv(games[0])
    text, info = env.reset()
    messages = fmt.messages(Observation(info["objective"], text, info["admissible_commands"]))
    for (start, end), action in zip(sample.turn_spans[:-1], sample.info["actions"][:-1], strict=True):
        text, _, _, _, info = env.step(action)
        reply = tok.decode(sample.response_ids[start:end], skip_special_tokens=True)
        messages += [{"role": "assistant", "content": fmt.prefill + reply},
                     fmt.followup(Observation(info["objective"], text, info["admissible_commands"]))]  # fmt: skip
    env.close()
    last_start = sample.turn_spans[-1][0]
    assert sample.prompt_ids + sample.response_ids[:last_start] == render_prompt(tok, messages, fmt.prefill)


def test_step_mode_samples_are_what_the_engine_saw(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    reply = look_look_win(tok, walkthroughs)
    engine, result = run(tok, reply, [task(g, 7) for g in games[:2]], mode="step")
    assert len(result.samples) == 6
    for sample in result.samples:
        k = sample.turn_idx
        assert sample.prompt_ids == engine.calls[k][sample.traj_id]
        assert sample.response_ids == reply(sample.prompt_ids, k)
        assert sample.loss_mask == [1] * len(sample.response_ids)
        assert sample.turn_spans == [(0, len(sample.response_ids))]
        assert sample.group_id == 7 and sample.reward == 1.0 and sample.stop_reason == "terminated"
        # with history_window=0, every prompt is one fresh render: the goal, no past actions
        text = tok.decode(sample.prompt_ids)
        assert "Goal:" in text and "\n> " not in text and text.endswith("<|im_start|>assistant\n<action>")
    assert sorted((s.traj_id, s.turn_idx) for s in result.samples) == [
        (t, k) for t in (0, 1) for k in range(3)
    ]


def test_step_mode_history_window(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    engine, _ = run(tok, look_look_win(tok, walkthroughs), [task(games[0])], mode="step", history_window=1)
    last_prompt = tok.decode(engine.calls[2][0])
    assert last_prompt.count("\n> look\n") == 1  # only the latest of the two past actions


def test_step_and_trajectory_modes_agree(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    # game 0 is won on turn 2; the other two never see their winning command and hit max_turns
    wanted = lambda turn: {"look"} if turn < 2 else {walkthroughs[games[0]][0], "look"}  # noqa: E731
    tasks = [task(g, i) for i, g in enumerate(games)]
    outcomes = {}
    for mode in ("step", "trajectory"):
        _, result = run(tok, policy(tok, wanted), tasks, mode=mode, max_turns=4)
        outcomes[mode] = {(s.traj_id, s.reward, s.stop_reason, tuple(s.info.get("actions", ()))) for s in result.samples
                          if s.turn_idx in (None, 0)}  # fmt: skip
        assert result.metrics["rollout/success"] == pytest.approx(1 / 3)
    assert outcomes["step"] == outcomes["trajectory"]
    by_traj = {t: (reward, stop) for t, reward, stop, _ in outcomes["step"]}
    assert by_traj == {0: (1.0, "terminated"), 1: (0.0, "max_turns"), 2: (0.0, "max_turns")}


# -- stop reasons and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_max_turns(smol_tokenizer, games, mode):
    tok = smol_tokenizer
    engine, result = run(tok, policy(tok, lambda turn: {"look"}), [task(games[0])], mode=mode, max_turns=3)
    assert len(engine.calls) == 3
    assert {(s.stop_reason, s.reward) for s in result.samples} == {("max_turns", 0.0)}
    assert result.metrics["rollout/stop/max_turns"] == 1.0 and result.metrics["rollout/turns"] == 3.0


def test_env_truncation(smol_tokenizer, games):
    tok = smol_tokenizer
    capped = Task(
        env_id="textworld", group_id=0, env_kwargs={"max_steps": 2}, reset_options={"game_file": games[0]}
    )
    _, result = run(tok, policy(tok, lambda turn: {"look"}), [capped], mode="trajectory")
    (sample,) = result.samples
    assert sample.stop_reason == "truncated" and len(sample.turn_spans) == 2 and sample.reward == 0.0


def test_max_tokens(smol_tokenizer, games):
    tok = smol_tokenizer
    reply = policy(tok, lambda turn: {"look"}, eos_every_other=False)  # the same ids every turn
    _, probe = run(tok, reply, [task(games[0])], mode="trajectory", max_turns=1)
    per_reply = probe.samples[0].num_sampled_tokens
    _, result = run(tok, reply, [task(games[0])], mode="trajectory", max_episode_tokens=2 * per_reply)
    (sample,) = result.samples
    assert sample.stop_reason == "max_tokens" and len(sample.turn_spans) == 2
    assert sample.num_sampled_tokens == 2 * per_reply


def test_parse_errors_play_the_fallback(smol_tokenizer, games):
    tok = smol_tokenizer
    babble = lambda prompt, turn: encode(tok, "banana")  # noqa: E731
    _, result = run(tok, babble, [task(games[0])], mode="step", max_turns=3)
    first = next(s for s in result.samples if s.turn_idx == 0)
    assert first.info["parse_errors"] == 3 and first.info["actions"] == ["look"] * 3
    assert [s.info["parse_error"] for s in sorted(result.samples, key=lambda s: s.turn_idx)] == [
        "no command number in <action></action>"] * 3  # fmt: skip
    assert result.metrics["rollout/invalid_rate"] == 1.0 and first.stop_reason == "max_turns"


def test_parse_error_limit_counts_consecutive_errors(smol_tokenizer, games):
    tok = smol_tokenizer
    # bad, good, bad, bad: the streak resets on the good reply and reaches 2 on turn 3
    look = policy(tok, lambda turn: {"look"})
    script = lambda prompt, turn: look(prompt, turn) if turn == 1 else encode(tok, "banana")  # noqa: E731
    _, result = run(tok, script, [task(games[0])], mode="trajectory", parse_error_limit=2)
    (sample,) = result.samples
    assert sample.stop_reason == "parse_error_limit" and sample.info["turns"] == 4
    assert sample.info["parse_errors"] == 3


class BrokenEnv(TextEnv):
    """Fails in `reset` or on the `fail_at`-th step, as a crashed simulator would."""

    def __init__(self, fail_at: int = 1, fail_on_reset: bool = False):
        self.fail_at, self.fail_on_reset, self.steps = fail_at, fail_on_reset, 0

    def reset(self, *, seed=None, options=None):
        if self.fail_on_reset:
            raise OSError("simulator did not start")
        return "A room.", {"admissible_commands": ["look", "wait"]}

    def step(self, action):
        self.steps += 1
        if self.steps >= self.fail_at:
            raise RuntimeError("simulator crashed")
        return "Nothing happens.", 0.0, False, False, {"won": False, "admissible_commands": ["look", "wait"]}

    def close(self):
        raise RuntimeError("simulator is gone")  # a crashed simulator may not close cleanly either


@pytest.fixture(scope="module")
def broken_env_id():
    env_id = f"test-broken-{uuid.uuid4().hex[:8]}"
    environments.register(env_id, BrokenEnv)
    return env_id


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_env_error_ends_only_its_episode(smol_tokenizer, games, walkthroughs, broken_env_id, mode):
    tok = smol_tokenizer
    tasks = [task(games[0], 0),
             Task(env_id=broken_env_id, group_id=1, env_kwargs={"fail_at": 2}),
             Task(env_id=broken_env_id, group_id=2, env_kwargs={"fail_on_reset": True}),
             task(games[1], 3)]  # fmt: skip
    engine, result = run(tok, look_look_win(tok, walkthroughs), tasks, mode=mode)
    assert [len(batch) for batch in engine.calls] == [3, 3, 2]  # the reset failure never reaches the engine
    stops = {s.traj_id: (s.stop_reason, s.reward) for s in result.samples}
    assert stops == {0: ("terminated", 1.0), 1: ("env_error", 0.0), 3: ("terminated", 1.0)}
    broken = next(s for s in result.samples if s.traj_id == 1 and s.turn_idx in (None, 0))
    assert broken.info["error"] == "RuntimeError: simulator crashed" and broken.info["turns"] == 2
    assert result.metrics["rollout/stop/env_error"] == 0.5 and result.metrics["rollout/episodes"] == 4.0


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_context_overflow(smol_tokenizer, games, walkthroughs, mode):
    tok = smol_tokenizer
    reply = policy(tok, lambda turn: {"look"})
    # step mode shows the past (observation, action): the second prompt is longer than the first
    extra = {"history_window": 2} if mode == "step" else {}
    _, first = run(tok, reply, [task(games[0])], mode=mode, max_turns=1, **extra)
    first_prompt = len(first.samples[0].prompt_ids)
    # room for the first prompt and its reply (max_new_tokens=16), not for the second prompt
    _, tight = run(tok, reply, [task(games[0])], mode=mode, max_context=first_prompt + 16, **extra)
    assert {s.stop_reason for s in tight.samples} == {"context_overflow"}
    assert tight.metrics["rollout/turns"] == 1.0
    _, none = run(tok, reply, [task(games[0])], mode=mode, max_context=10, **extra)
    assert none.samples == [] and none.metrics["rollout/stop/context_overflow"] == 1.0


def test_seed_differs_per_round_and_repeats_per_run(smol_tokenizer, games):
    """A seeded rollout is reproducible, but no two rounds replay the same random draws."""
    tok = smol_tokenizer

    class SeedRecorder(ScriptedEngine):
        def generate(self, prompts, sampling):
            seeds.append(sampling.seed)
            return super().generate(prompts, sampling)

    seeds = []
    look = policy(tok, lambda turn: {"look"})
    for seed in (5, 5, None):
        Rollout(SeedRecorder(look), tok, RolloutConfig(max_turns=3)).run([task(games[0])], GREEDY, seed=seed)
    assert seeds[:3] == seeds[3:6] and len(set(seeds[:3])) == 3
    assert seeds[6:] == [None] * 3


# -- per-turn records (GiGPO anchors and step rewards) ---------------------------------------------


def test_step_mode_records_step_rewards_and_anchor_keys(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    # two episodes of game 0 and one of game 1, each: look, look, win (the env rewards the win)
    tasks = [task(games[0], 0), task(games[0], 0), task(games[1], 1)]
    _, result = run(tok, look_look_win(tok, walkthroughs), tasks, mode="step")
    turns = {(s.traj_id, s.turn_idx): s for s in result.samples}
    for t in range(3):
        assert [turns[t, k].step_reward for k in range(3)] == [0.0, 0.0, 1.0]
        assert all(turns[t, k].anchor_key for k in range(3))
    # same game, same turn: the same raw observation, so the same anchor; another game differs
    assert [turns[0, k].anchor_key for k in range(3)] == [turns[1, k].anchor_key for k in range(3)]
    assert turns[0, 0].anchor_key != turns[2, 0].anchor_key
    # the hash is of the observation, not the prompt (whose history grows): `look` leaves the
    # state as it was, so the three turns share one anchor state
    assert len({turns[0, k].anchor_key for k in range(3)}) == 1
    assert turns[0, 0].info["turn_rewards"] == [0.0, 0.0, 1.0]
    assert turns[0, 0].info["anchor_keys"] == [turns[0, k].anchor_key for k in range(3)]


def test_trajectory_mode_records_per_turn_lists(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    tasks = [task(games[0])]
    _, traj = run(tok, look_look_win(tok, walkthroughs), tasks, mode="trajectory")
    _, step = run(tok, look_look_win(tok, walkthroughs), tasks, mode="step")
    (sample,) = traj.samples
    assert sample.turn_idx is None and sample.anchor_key is None
    assert sample.info["turn_rewards"] == [0.0, 0.0, 1.0]
    assert sample.info["anchor_keys"] == [s.anchor_key for s in sorted(step.samples, key=lambda s: s.turn_idx)]


def test_anchor_key_is_stable():
    from agents.rollout import anchor_key

    obs = Observation("win", "You are in a room.", ["look", "go north"])
    assert anchor_key(obs) == anchor_key(Observation("win", "You are in a room.", ["look", "go north"]))
    raw = json.dumps(["win", "You are in a room.", ["look", "go north"]]).encode()
    assert anchor_key(obs) == hashlib.sha1(raw).hexdigest()[:16]  # not Python's salted hash()
    assert anchor_key(obs) != anchor_key(Observation("win", "You are in a room.", ["look"]))
    assert anchor_key(None) is None


# -- env pool: worker processes, timeouts ---------------------------------------------------------


def test_env_workers_give_the_in_process_samples(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    tasks = [task(g, i) for i, g in enumerate(games)]
    samples = {}
    for workers in (0, 2):
        _, result = run(tok, look_look_win(tok, walkthroughs), tasks, mode="trajectory", env_workers=workers)
        samples[workers] = sorted(result.samples, key=lambda s: s.traj_id)
        assert result.metrics["rollout/success"] == 1.0
    assert samples[0] == samples[2]


def test_env_error_in_a_worker_ends_only_its_episode(smol_tokenizer, games, walkthroughs, broken_env_id):
    """The same as in-process: the registered class reaches the worker, its exception comes back."""
    tok = smol_tokenizer
    tasks = [task(games[0], 0), Task(env_id=broken_env_id, group_id=1, env_kwargs={"fail_at": 2})]
    _, result = run(tok, look_look_win(tok, walkthroughs), tasks, mode="trajectory", env_workers=2)
    stops = {s.traj_id: (s.stop_reason, s.info["error"]) for s in result.samples}
    assert stops == {0: ("terminated", None), 1: ("env_error", "RuntimeError: simulator crashed")}


def test_a_hung_env_step_times_out(smol_tokenizer, games, walkthroughs):
    from tests.environments import pool_envs  # noqa: F401 - registers pool-counter

    tok = smol_tokenizer
    hangs = Task(env_id="pool-counter", group_id=1, env_kwargs={"hang_at": 2})
    tasks = [task(games[0], 0), hangs, task(games[1], 2)]
    engine, result = run(tok, look_look_win(tok, walkthroughs), tasks, mode="step", env_workers=2,
                         env_step_timeout=1.0)  # fmt: skip
    stops = {(s.traj_id, s.stop_reason) for s in result.samples}
    assert stops == {(0, "terminated"), (1, "timeout"), (2, "terminated")}
    hung = next(s for s in result.samples if s.traj_id == 1 and s.turn_idx == 0)
    assert hung.info["turns"] == 2 and "step took over 1.0 s" in hung.info["error"]
    assert [len(batch) for batch in engine.calls] == [3, 3, 2]


# -- expert agent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_expert_plays_the_walkthroughs(games, walkthroughs, workers):
    rollout = Rollout(None, None, RolloutConfig(agent="expert", mode="trajectory", env_workers=workers))
    try:
        result = rollout.run([task(g, i) for i, g in enumerate(games)], GREEDY)
    finally:
        rollout.close()
    assert result.metrics["rollout/success"] == 1.0 and result.metrics["rollout/stop/terminated"] == 1.0
    for sample in result.samples:
        assert sample.info["actions"] == walkthroughs[games[sample.traj_id]]
        assert sample.response_ids == [] and sample.num_sampled_tokens == 0  # nothing to train on


def test_expert_needs_a_walkthrough():
    from tests.environments import pool_envs  # noqa: F401 - registers pool-counter (no walkthrough)

    result = Rollout(None, None, RolloutConfig(agent="expert")).run([Task("pool-counter", 0)], GREEDY)
    (episode,) = result.episodes
    assert episode["stop_reason"] == "env_error" and "gave no walkthrough" in episode["error"]
    with pytest.raises(ValueError, match="needs an inference engine"):
        Rollout(None, None, RolloutConfig())


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_cli_with_the_expert_agent_wins_every_game(game_cache, monkeypatch, capsys, workers):
    """`entrorl eval CONFIG agent=expert` loads no model (the name given here does not exist) and
    wins every game of the set."""
    from trainer.cli import main

    monkeypatch.setenv("ENTRORL_CACHE", str(game_cache))
    monkeypatch.chdir(ROOT)
    overrides = ["agent=expert", "model.name=/no/such/model", "env.eval.seeds=[1,4]", f"rollout.env_workers={workers}"]
    assert main(["eval", "configs/debug/cpu_tiny.yaml", *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"eval/success": 1.0, "eval/episodes": 3.0, "eval/turns": 1.0, "eval/stop/terminated": 1.0}
    assert main(["train", "configs/debug/cpu_tiny.yaml", "agent=expert"]) == 2

# -- branching (agents/brancher.py decides, the rollout forks) ------------------------------------
# The scripted engine gives every turn the same entropies (dH = 0), so tau decides: with tau 1 and
# weight 0 every draw branches (P = clip(tau + w dH) = 1); with tau 0 none does.

ALWAYS = BranchConfig("arpo", roots=2, beam=2, tau=1.0, weight=0.0)
NEVER = BranchConfig("arpo", roots=2, beam=2, tau=0.0, weight=0.0)



@pytest.mark.parametrize("mode", ["trajectory", "step"])
def test_branches_fill_the_budget_and_continue_from_the_parent(smol_tokenizer, games, walkthroughs, mode):
    tok = smol_tokenizer
    engine, result = run(tok, look_look_win(tok, walkthroughs), [task(games[0])] * 4, mode=mode, branch=ALWAYS)
    episodes = result.episodes
    assert len(episodes) == 4  # exactly algo.group_size leaves
    assert [ep["parent_id"] for ep in episodes] == [None, None, 0, 1]  # both roots forked after turn 1
    assert [ep["fork_turn"] for ep in episodes] == [None, None, 1, 1]
    assert all(ep["won"] and ep["actions"][:2] == ["look", "look"] for ep in episodes)
    # round 1: the 2 roots; round 2 on: roots and branches in one engine call
    assert [len(call) for call in engine.calls] == [2, 4, 4]
    # a branch's first own prompt is its parent's next prompt: same tokens, same env state
    assert engine.calls[1][2] == engine.calls[1][0] and engine.calls[1][3] == engine.calls[1][1]
    m = result.metrics
    assert m["branch/per_group"] == 2.0 and m["branch/max_depth"] == 1.0 and m["branch/budget_used"] == 1.0
    assert m["branch/tokens_saved"] > 0  # the branches did not re-generate their first turn
    if mode == "trajectory":
        samples = {s.traj_id: s for s in result.samples}
        for child, parent in ((2, 0), (3, 1)):
            fork = samples[child].fork_token
            assert fork == samples[child].turn_spans[1][0] > 0
            assert samples[child].response_ids[:fork] == samples[parent].response_ids[:fork]
            assert samples[child].prompt_ids == samples[parent].prompt_ids
            assert samples[child].parent_id == parent and samples[child].fork_turn == 1
    else:  # step mode: the shared first turn is a sample of the parent only
        turns = sorted((s.traj_id, s.turn_idx) for s in result.samples)
        assert turns == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]


def test_aepo_premonitoring_probes_each_group_once(smol_tokenizer, games, walkthroughs):
    """One probe episode per group (3 turns, not trained on); every turn has the same step
    entropy here, so H_root = H_tool and m = floor(k sigmoid(0)) + 1 = 3 of k = 4 roots."""
    tok = smol_tokenizer
    cfg = BranchConfig("aepo", premonitor=True, beam=2, tau=0.0, weight=0.0)  # no branch fires
    engine, result = run(tok, look_look_win(tok, walkthroughs), [task(games[0])] * 4, mode="step", branch=cfg)
    # the probe plays its 3 turns alone; then the 3 roots (the policy keys on the engine call,
    # so from call 3 on every reply wins at once), then the 4th slot as a fresh root
    assert [len(call) for call in engine.calls] == [1, 1, 1, 3, 1]
    m = result.metrics
    assert m["branch/premonitor_roots"] == 3.0 and m["branch/probe_tokens"] > 0
    assert len(result.episodes) == 4 and all(ep["parent_id"] is None for ep in result.episodes)


def test_unused_budget_starts_new_roots(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    engine, result = run(tok, look_look_win(tok, walkthroughs), [task(games[0])] * 4, mode="step", branch=NEVER)
    assert len(result.episodes) == 4 and all(ep["parent_id"] is None for ep in result.episodes)
    # the 2 reserved slots start only once the group has no live path (after the roots' 3 turns);
    # the scripted policy keys on the engine call, so the new roots win at once (call 3)
    assert [len(call) for call in engine.calls] == [2, 2, 2, 2]
    assert [ep["turns"] for ep in result.episodes] == [3, 3, 1, 1]
    assert result.metrics["branch/per_group"] == 0.0 and result.metrics["branch/budget_used"] == 1.0


def test_groups_branch_independently_and_never_exceed_their_budget(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    tasks = [task(games[0], group_id=0)] * 3 + [task(games[1], group_id=1)] * 5
    cfg = BranchConfig("aepo", roots=1, beam=4, tau=1.0, weight=0.0, penalty=0.0)
    _, result = run(tok, look_look_win(tok, walkthroughs), tasks, mode="trajectory", branch=cfg)
    per_group = {0: 0, 1: 0}
    for s in result.samples:
        per_group[s.group_id] += 1
    assert per_group == {0: 3, 1: 5}
    ids = {s.traj_id: s for s in result.samples}
    for s in result.samples:  # a branch's parent is in its own group and older than it
        if s.parent_id is not None:
            assert ids[s.parent_id].group_id == s.group_id and s.parent_id < s.traj_id


def test_branch_tree_reaches_the_tree_advantage(smol_tokenizer, games, walkthroughs):
    from trainer.config import Config, NamedConfig
    from trainer.loop import compute_advantages

    tok = smol_tokenizer
    _, result = run(tok, look_look_win(tok, walkthroughs), [task(games[0])] * 4, mode="trajectory", branch=ALWAYS)
    cfg = Config()
    cfg.algo.advantage = NamedConfig("grpo_tree", {"attribution": "hard", "dedup_prefix": True})
    samples = result.samples
    rows, metrics, _ = compute_advantages(samples, cfg)
    assert metrics["adv/shared_prefix_frac"] > 0
    for s in samples:  # dedup: a branch trains only its own tokens, the shared prefix once
        if s.parent_id is not None:
            assert sum(s.loss_mask[: s.fork_token]) == 0 and sum(s.loss_mask[s.fork_token :]) > 0


def test_entropy_by_token_role(smol_tokenizer, games, walkthroughs):
    """Every reply here is `N</action>` (+ EOS) after the `<action>` prefill: all tokens are
    action tokens, and their mean entropy is the rollout's mean entropy."""
    tok = smol_tokenizer
    _, result = run(tok, look_look_win(tok, walkthroughs), [task(g) for g in games], mode="step")
    m = result.metrics
    assert [k for k in m if k.startswith("entropy/role/")] == ["entropy/role/action"]
    assert m["entropy/role/action"] == pytest.approx(m["entropy/rollout_mean"], rel=1e-9)


class FlakyEngine(ScriptedEngine):
    """Stands in for an engine fault: `fail_calls` whole calls raise (a transient error), and any
    call holding a prompt of a poisoned episode always raises (a request the engine cannot serve)."""

    def __init__(self, reply, eos_id, fail_calls=0, poisoned=()):
        super().__init__(reply, eos_id)
        self.fail_calls, self.poisoned, self.failed = fail_calls, poisoned, 0

    def generate(self, prompts, sampling):
        if self.failed < self.fail_calls:
            self.failed += 1
            raise RuntimeError("transient engine fault")
        if any(any(marker in p for marker in self.poisoned) for p in prompts):
            raise RuntimeError("cannot serve this request")
        return super().generate(prompts, sampling)


def test_engine_faults_are_retried_and_isolated(smol_tokenizer, games, walkthroughs):
    tok = smol_tokenizer
    reply = look_look_win(tok, walkthroughs)
    config = RolloutConfig(max_new_tokens=16, max_turns=6)
    tasks = [task(g, i) for i, g in enumerate(games)]
    engine = FlakyEngine(reply, tok.eos_token_id, fail_calls=1)  # one transient failure: retried
    result = Rollout(engine, tok, config).run(tasks, GREEDY)
    assert [ep["won"] for ep in result.episodes] == [True, True, True]
    # a request the engine can never serve: poison a token that only episode 1's prompts hold
    # (its game's text differs from the others')
    first_prompts = ScriptedEngine(reply, tok.eos_token_id)
    Rollout(first_prompts, tok, config).run(tasks, GREEDY)
    own = set(first_prompts.calls[0][1]) - set(first_prompts.calls[0][0]) - set(first_prompts.calls[0][2])
    assert own, "episode 1's first prompt should hold a token the others lack"
    engine = FlakyEngine(reply, tok.eos_token_id, poisoned=(next(iter(own)),))
    result = Rollout(engine, tok, config).run(tasks, GREEDY)
    stops = [ep["stop_reason"] for ep in result.episodes]
    assert stops[1] == "engine_error" and "cannot serve" in result.episodes[1]["error"]
    assert stops[0] == stops[2] == "terminated" and result.episodes[0]["won"] and result.episodes[2]["won"]
