"""Forking episodes (EnvPool.fork / fork_many): a fork continues exactly as its original does
(same observations, rewards and flags for the same following actions), by snapshot/restore where
the env has them and by replaying the action history where it does not (TextWorld); a replay that
diverges is an error that says so.

Run: .venv/bin/python -m pytest tests/environments/test_fork.py -q   (~10 s on 2 cores)
"""

import pytest

from environments.pool import EnvError, EnvPool, ForkError
from environments.textworld_env import ensure_games
from tests.environments import pool_envs  # noqa: F401 - registers the pool-* test envs
from tests.environments.test_pool import without_pid


@pytest.fixture(scope="module")
def games(game_cache):
    return ensure_games([1, 2], cache_dir=game_cache)


def continue_both(pool, original, fork, actions):
    """Step the original and the fork with the same actions; their results side by side."""
    return [without_pid(pool.step_many([original, fork], [a, a])) for a in actions]


@pytest.mark.parametrize("workers", [0, 2])
def test_fork_by_snapshot(workers):
    # pool-noisy-snapshot ignores the reset seed: only a snapshot can clone it (a replay diverges)
    with EnvPool(workers) as pool:
        original = pool.open("pool-noisy-snapshot", {"limit": 50})
        pool.reset_many([original])
        pool.step_many([original], ["look"])
        pool.step_many([original], ["wait"])
        fork = pool.fork(original)
        assert pool.history(fork) == pool.history(original) == ["look", "wait"]
        for mine, theirs in continue_both(pool, original, fork, ["look", "x", "wait", "look"]):
            assert isinstance(mine, tuple) and mine == theirs


@pytest.mark.parametrize("workers", [0, 2])
def test_fork_by_replay_on_textworld(games, workers):
    with EnvPool(workers) as pool:
        handles = [pool.open("textworld", {"admissible_commands": True}) for _ in games]
        pool.reset_many(handles, None, [{"game_file": g} for g in games])
        wins = pool.walkthrough_many(handles)
        pool.step_many(handles, ["look", "inventory"])
        pool.step_many(handles, ["examine zorkmid", "look"])  # an unknown noun, then a look
        forks = pool.fork_many(handles)
        assert all(isinstance(f, int) for f in forks)
        for original, fork, win in zip(handles, forks, wins, strict=True):
            steps = continue_both(pool, original, fork, ["inventory", *win])
            assert all(mine == theirs for mine, theirs in steps)
            obs, reward, terminated, _, info = steps[-1][0]
            assert terminated and info["won"] and reward == 1.0


def test_a_fork_of_a_fork_by_replay():
    with EnvPool(0) as pool:
        original = pool.open("pool-counter", {"limit": 50})
        pool.reset_many([original], [7])
        pool.step_many([original], ["a"])
        first = pool.fork(original)
        pool.step_many([original, first], ["b", "b"])
        second = pool.fork(first)
        assert pool.history(second) == ["a", "b"]
        steps = [pool.step_many([original, first, second], [a] * 3) for a in "cdef"]
        assert all(r[0] == r[1] == r[2] for r in steps)


@pytest.mark.parametrize("env_id, where", [("pool-noisy", r"step 0 \(reset\)"), ("pool-noisy-step", r"step 1 \('look'\)")])
def test_a_diverging_replay_is_an_error(env_id, where):
    with EnvPool(0) as pool:
        handle = pool.open(env_id)
        pool.reset_many([handle], [0])
        pool.step_many([handle], ["look"])
        with pytest.raises(ForkError, match=rf"replay diverged at {where}.*give it snapshot\(\)/restore\(\)"):
            pool.fork(handle)
        (result,) = pool.fork_many([handle])
        assert isinstance(result, EnvError) and result.reason == "env_error"
        assert len(pool._records) == 1  # the failed forks were closed
        assert isinstance(pool.step_many([handle], ["look"])[0], tuple)  # the original goes on
