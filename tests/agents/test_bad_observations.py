"""Bad env output never crashes a run (issue #9): observations with lone surrogates (bytes decoded
with `surrogateescape`) or of gigantic size are sanitised before they are tokenized
(`agents.rollout.sanitize_observation`, capped by `rollout.max_obs_chars`).

Run: .venv/bin/python -m pytest tests/agents/test_bad_observations.py -q
"""

import pytest

import environments
from agents.chat import encode
from agents.config import RolloutConfig, SamplingConfig
from agents.engines.scripted import ScriptedEngine
from agents.rollout import Rollout, Task, sanitize_observation
from environments import TextEnv

BIG = 5_000_000
MARKER = "\n[... {} chars dropped ...]\n"


# -- the pure function ----------------------------------------------------------------------------


def test_lone_surrogates_become_the_replacement_character():
    raw = b"caf\xe9 \xff ok".decode("utf-8", errors="surrogateescape")
    assert raw == "caf\udce9 \udcff ok"
    assert sanitize_observation(raw) == "caf\ufffd \ufffd ok"
    assert sanitize_observation("end\ud800") == "end\ufffd"  # a high surrogate with no low one
    assert sanitize_observation("\ud83d\ude00!") == "\U0001f600!"  # a well-formed pair is its character
    assert sanitize_observation(raw).encode("utf-8")  # now encodable


def test_bytes_and_non_strings_become_text():
    assert sanitize_observation(b"a\xffb") == "a\ufffdb"
    assert sanitize_observation(None) == ""
    assert sanitize_observation(42) == "42"


@pytest.mark.parametrize("max_chars", [0, 10, 11, 100])
def test_short_text_is_unchanged(max_chars):
    text = "Box.\n\t{✓ é"
    assert len(text) == 10
    assert sanitize_observation(text, max_chars) == text


def test_long_text_keeps_head_and_tail_around_a_marker():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    out = sanitize_observation(text, 100)
    assert out == text[:50] + MARKER.format(900) + text[-50:]
    odd = sanitize_observation(text, 101)  # the head takes the odd character
    assert odd == text[:51] + MARKER.format(899) + text[-50:]
    one = sanitize_observation(text, 1)
    assert one == "a" + MARKER.format(999)  # no tail at all (text[-0:] would be all of it)
    assert sanitize_observation(text, 999) == text[:500] + MARKER.format(1) + text[-499:]


def test_zero_means_no_cap():
    text = "x" * 100_000
    assert sanitize_observation(text, 0) == text


def test_a_surrogate_pair_cut_in_half_is_replaced():
    pair = "\ud83d\ude00"
    assert sanitize_observation("a" * 9 + pair + "b" * 9, 20) == "a" * 9 + "\U0001f600" + "b" * 9  # not cut
    head_cut = sanitize_observation("a" * 9 + pair + "b" * 11, 20)  # the head ends on the high half
    assert head_cut == "a" * 9 + "\ufffd" + MARKER.format(2) + "b" * 10
    tail_cut = sanitize_observation("a" * 11 + pair + "b" * 9, 20)  # the tail starts on the low half
    assert tail_cut == "a" * 10 + MARKER.format(2) + "\ufffd" + "b" * 9


def test_the_tokenizer_refuses_what_is_not_sanitised(smol_tokenizer):
    """Why the sanitising exists: a lone surrogate crashes tokenization."""
    with pytest.raises(Exception):  # noqa: B017 - TypeError or UnicodeEncodeError, by tokenizer version
        encode(smol_tokenizer, "a\udcffb")
    assert encode(smol_tokenizer, sanitize_observation("a\udcffb"))


# -- the real rollout loop ------------------------------------------------------------------------


class BadObsEnv(TextEnv):
    """An env whose every observation is bad: surrogates in the reset text, objective and
    commands, then a 5 MB observation, then surrogates again, and so on."""

    def __init__(self):
        self.task = "count the \udcff boxes"
        self.t = 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return "start \udcff\udcfe here", self._info()

    def _info(self):
        return {
            "won": False,
            "objective": "open the \udce9 box",
            "admissible_commands": ["look", "take caf\udce9"],
        }

    def step(self, action):
        self.t += 1
        text = "HEAD" + "x" * BIG + "TAIL" if self.t % 2 else f"you did {action!r}: \udcff\udc80 done"
        return text, 0.0, False, False, self._info()


environments.register("test-bad-observations", "tests.agents.test_bad_observations:BadObsEnv")


@pytest.mark.parametrize(("mode", "workers"), [("trajectory", 0), ("step", 0), ("trajectory", 1)])
def test_rollout_survives_gigantic_and_undecodable_observations(smol_tokenizer, mode, workers):
    tok = smol_tokenizer
    reply = encode(tok, "2</action>") + [tok.eos_token_id]
    engine = ScriptedEngine(lambda prompt, turn: reply, eos_id=tok.eos_token_id)
    cfg = RolloutConfig(mode=mode, max_turns=4, max_new_tokens=8, max_obs_chars=1000, max_context=4096,
                        env_workers=workers)  # fmt: skip
    rollout = Rollout(engine, tok, cfg)
    try:
        result = rollout.run([Task("test-bad-observations", group_id=g) for g in range(2)], SamplingConfig())
    finally:
        rollout.close()
    assert [ep["stop_reason"] for ep in result.episodes] == ["max_turns", "max_turns"]
    assert all(ep["error"] is None and ep["turns"] == 4 for ep in result.episodes)
    # the commands were offered sanitised, and the one picked was played
    assert all(ep["actions"] == ["take caf\ufffd"] * 4 for ep in result.episodes)
    # turns 1 and 3 of each episode saw a 5 MB observation (after steps 1 and 3; the 4th step ends it)
    assert result.metrics["rollout/obs_truncated"] == 2 * 2
    # every prompt the engine saw is bounded: about 1000 chars of 'x' are ~250 tokens
    seen = [prompt for call in engine.calls for prompt in call]
    assert len(seen) == 8 and max(len(p) for p in seen) < 4096 - 8
    last = tok.decode(seen[-1])
    assert f"[... {BIG + 8 - 1000} chars dropped ...]" in last and "HEAD" in last and "TAIL" in last
    assert "\ufffd" in last and "open the \ufffd box" in tok.decode(seen[0])
    assert len(result.samples) == (2 if mode == "trajectory" else 8)
    for sample in result.samples:
        assert len(sample.prompt_ids) + len(sample.response_ids) < 4096
