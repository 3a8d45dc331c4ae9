"""The env registry and `check_env`, on tiny envs defined here."""

import random

import pytest

from environments import base
from environments.base import TextEnv, check_env, make, register, registered_ids


class CountEnv(TextEnv):
    """Counts steps; the episode ends after `length` steps. Satisfies the contract."""

    def __init__(self, length: int = 2):
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.count = 0
        return "count 0", {}

    def step(self, action):
        self.count += 1
        return f"count {self.count}", 0.0, self.count >= self.length, False, {"won": False}


class RandomStartEnv(CountEnv):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return f"count {random.random()}", {}  # ignores the seed


class BytesObservationEnv(CountEnv):
    def step(self, action):
        obs, *rest = super().step(action)
        return (obs.encode(), *rest)


class IntFlagsEnv(CountEnv):
    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, int(terminated), int(truncated), info


class FourTupleEnv(CountEnv):
    def step(self, action):
        return super().step(action)[:4]


class BadToolEnv(CountEnv):
    tools = [{"name": "calc", "parameters": {}}]


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def test_make_unknown_id_lists_the_registered_ids():
    with pytest.raises(KeyError, match="textworld"):
        make("no-such-env")


def test_register_and_make_with_kwargs():
    register("count", CountEnv)
    register("count", CountEnv)  # the same entry point again is fine
    assert "count" in registered_ids()
    assert make("count", length=5).length == 5


def test_register_twice_with_another_entry_point_raises():
    register("count", CountEnv)
    with pytest.raises(ValueError, match="already registered"):
        register("count", "somewhere.else:CountEnv")


def test_check_env_accepts_a_correct_env():
    check_env(CountEnv())


@pytest.mark.parametrize(
    "env, message",
    [
        (RandomStartEnv(), "not deterministic"),
        (BytesObservationEnv(), "observation must be str"),
        (IntFlagsEnv(), "must be bool"),
        (FourTupleEnv(), "5 values"),
        (BadToolEnv(), "tool spec lacks keys"),
    ],
)
def test_check_env_catches_broken_envs(env, message):
    with pytest.raises(AssertionError, match=message):
        check_env(env)


BUILT_IN = ("alfworld", "math", "scienceworld", "textworld")


def built_in_kwargs(env_id: str, game_cache) -> dict:
    """What each built-in env needs to reset without options (TextWorld has no default game)."""
    if env_id == "textworld":
        from environments.textworld_env import ensure_games

        return {"game_file": ensure_games([1], cache_dir=game_cache)[0]}
    return {}


def test_every_built_in_id_is_checked():
    from environments import base

    entry = base._REGISTRY
    built_in = {i for i in registered_ids() if isinstance(entry[i], str) and entry[i].startswith("environments.")}
    assert built_in == set(BUILT_IN), "a new env id needs a check_env case here"


@pytest.mark.parametrize("env_id", BUILT_IN)
def test_check_env_passes_for_every_built_in_id(env_id, game_cache):
    env = make(env_id, **built_in_kwargs(env_id, game_cache))
    try:
        check_env(env, seed=0)
    finally:
        env.close()
