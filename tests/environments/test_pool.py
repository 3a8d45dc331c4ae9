"""EnvPool (environments/pool.py): worker processes give the in-process results; an env that
raises, a worker that dies or hangs ends only the envs it hosted; the worker is replaced and takes
new envs; no process (nor anything a worker started) outlives the pool.

Test envs live in tests/environments/pool_envs.py (importable by the workers).

Run: .venv/bin/python -m pytest tests/environments/test_pool.py -q   (~15 s on 2 cores)
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from environments.pool import EnvError, EnvPool
from environments.textworld_env import ensure_games
from tests.environments import pool_envs  # noqa: F401 - registers the pool-* test envs

ROOT = Path(__file__).resolve().parents[2]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed in a container may wait for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def without_pid(results):
    """Results with the worker's pid taken out of each info (the only thing that differs)."""
    out = []
    for r in results:
        if isinstance(r, tuple) and isinstance(r[-1], dict):
            r = (*r[:-1], {k: v for k, v in r[-1].items() if k != "pid"})
        out.append(r)
    return out


def play(pool, specs, scripts):
    """Open and reset one env per (env_id, kwargs, seed, options), then step all of them through
    `scripts` (one action list per env) in lockstep batches; each env's results, reset first."""
    handles = [pool.open(env_id, kwargs) for env_id, kwargs, _, _ in specs]
    out = [[r] for r in pool.reset_many(handles, [s[2] for s in specs], [s[3] for s in specs])]
    for k in range(max(len(s) for s in scripts)):
        live = [i for i, script in enumerate(scripts) if k < len(script)]
        results = pool.step_many([handles[i] for i in live], [scripts[i][k] for i in live])
        for i, result in zip(live, without_pid(results), strict=True):
            out[i].append(result)
    pool.close_many(handles)
    return out


@pytest.fixture(scope="module")
def games(game_cache):
    return ensure_games([1, 2], cache_dir=game_cache)


def test_workers_give_the_in_process_results(games):
    tw = {"admissible_commands": True}
    specs = [("pool-counter", {}, 1, None), ("pool-counter", {"limit": 3}, 2, None),
             ("textworld", tw, None, {"game_file": games[0]}), ("textworld", tw, None, {"game_file": games[1]})]  # fmt: skip
    with EnvPool(0) as pool:
        handles = [pool.open("textworld", tw) for _ in games]
        pool.reset_many(handles, None, [{"game_file": g} for g in games])
        wins = pool.walkthrough_many(handles)
    scripts = [["look"] * 5, ["a", "b", "c"], ["look", "inventory", *wins[0]], ["inventory", *wins[1]]]
    with EnvPool(0) as pool:
        local = play(pool, specs, scripts)
    with EnvPool(2) as pool:
        remote = play(pool, specs, scripts)
        assert len(pool.pids) == 2
    assert remote == local
    assert [results[-1][2:4] for results in local] == [(False, False), (False, True), (True, False), (True, False)]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_env_that_raises_is_a_result_not_a_raise(workers):
    with EnvPool(workers) as pool:
        handles = [pool.open("pool-counter") for _ in range(3)]
        pool.reset_many(handles, [0, 1, 2])
        first = pool.step_many(handles, ["look", "crash", "look"])
        assert first[1] == EnvError("env_error", "RuntimeError: simulator crashed")
        assert all(isinstance(r, tuple) for r in (first[0], first[2]))
        again = pool.step_many([handles[0], handles[2]], ["look", "look"])
        assert all(isinstance(r, tuple) for r in again)  # the others (and their worker) go on


def test_a_dead_worker_ends_only_its_envs_and_is_replaced():
    with EnvPool(2) as pool:
        handles = [pool.open("pool-counter") for _ in range(4)]  # workers 0, 1, 0, 1
        pool.reset_many(handles, [0, 1, 2, 3])
        old = pool.pids
        results = pool.step_many(handles, ["die", "look", "look", "look"])
        assert results[0].reason == "env_error" and "died (exit code 3)" in results[0].message
        assert results[2].reason == "env_error" and results[2].message.startswith("lost with its worker")
        assert isinstance(results[1], tuple) and isinstance(results[3], tuple)
        later = pool.step_many(handles, ["look"] * 4)
        assert [isinstance(r, EnvError) for r in later] == [True, False, True, False]
        assert not running(old[0]) and pool.pids[1] == old[1] and pool.pids[0] != old[0]
        fresh = pool.open("pool-counter")  # goes to the replaced worker, which works
        pool.reset_many([fresh], [4])
        (result,) = pool.step_many([fresh], ["look"])
        assert result[4]["pid"] == pool.pids[0]


def test_a_worker_killed_mid_step():
    with EnvPool(1) as pool:
        handle = pool.open("pool-counter")
        pool.reset_many([handle], [0])
        (pid,) = pool.pids
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        (result,) = pool.step_many([handle], ["sleep:30"])
        assert time.monotonic() - started < 10
        assert result.reason == "env_error" and "exit code -9" in result.message


def test_a_hung_step_times_out_and_its_worker_is_killed_with_what_it_started():
    with EnvPool(2, step_timeout=1.0) as pool:
        handles = [pool.open("pool-counter") for _ in range(2)]  # one per worker
        pool.reset_many(handles, [0, 1])
        (spawned, _) = pool.step_many(handles, ["spawn", "look"])
        child = int(spawned[0].split()[1])  # a process the env started, as a JVM would be
        assert running(child)
        hung_worker = pool.pids[0]
        started = time.monotonic()
        hung, fine = pool.step_many(handles, ["hang", "sleep:0.2"])
        assert 1.0 <= time.monotonic() - started < 5
        assert hung.reason == "timeout" and "step took over 1.0 s" in hung.message
        assert isinstance(fine, tuple)
        assert not running(hung_worker) and not running(child)
        assert pool.step_many(handles[:1], ["look"])[0].reason == "env_error"  # lost with its worker


def test_the_timeout_is_per_step():
    """Two 0.6 s steps on one worker take 1.2 s in all, yet neither overruns a 1 s step timeout."""
    with EnvPool(1, step_timeout=1.0) as pool:
        handles = [pool.open("pool-counter") for _ in range(2)]
        pool.reset_many(handles, [0, 1])
        assert all(isinstance(r, tuple) for r in pool.step_many(handles, ["sleep:0.6", "sleep:0.6"]))


def test_close_leaves_no_process():
    pool = EnvPool(2)
    assert pool.pids == []  # workers start on first use
    handles = [pool.open("pool-counter") for _ in range(2)]
    pool.reset_many(handles, [0, 1])
    pids = pool.pids
    assert len(pids) == 2 and all(map(running, pids))
    pool.close()
    assert not any(map(running, pids))
    pool.close()  # idempotent


def test_interpreter_exit_stops_the_workers(tmp_path):
    """A program that never closes its pool leaves no worker behind (atexit)."""
    script = tmp_path / "leaky.py"
    script.write_text(
        "from environments.pool import EnvPool\n"
        "import tests.environments.pool_envs\n"
        "if __name__ == '__main__':\n"
        "    pool = EnvPool(2)\n"
        "    handles = [pool.open('pool-counter') for _ in range(2)]\n"
        "    pool.reset_many(handles, [0, 1])\n"
        "    print(*pool.pids)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2 and not any(map(running, pids))
