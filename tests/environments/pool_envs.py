"""Small envs for the env-pool and fork tests, registered by string entry point so that a spawned
worker process can import them.

`CounterEnv` is a seeded random walk (deterministic: forks replay it); special actions make the
process misbehave as a broken simulator would: `crash` raises, `die` exits the process, `hang`
sleeps for an hour, `sleep:S` sleeps S seconds first, `spawn` starts a child process (as a
simulator starts a JVM) and reports its pid. `hang_at=k` hangs on the k-th step.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

from environments import TextEnv, register

COMMANDS = ["look", "wait"]


class CounterEnv(TextEnv):
    def __init__(self, limit: int = 20, hang_at: int | None = None):
        self.limit, self.hang_at = limit, hang_at
        self.rng, self.total, self.t = random.Random(0), 0, 0
        self.task = "count to 30"

    def reset(self, *, seed=None, options=None):
        self.rng, self.total, self.t = self._rng(seed), 0, 0
        return f"start {self.rng.random():.6f}", {"won": False, "admissible_commands": COMMANDS}

    def _rng(self, seed):
        return random.Random(seed)

    def step(self, action):
        self.t += 1
        if action == "crash":
            raise RuntimeError("simulator crashed")
        if action == "die":
            os._exit(3)
        if action == "hang" or self.t == self.hang_at:
            time.sleep(3600)
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":")[1]))
        if action == "spawn":
            child = subprocess.Popen(["sleep", "600"])
            return f"child {child.pid}", 0.0, False, False, {"won": False, "admissible_commands": COMMANDS}
        x = self.rng.randint(0, 9)
        self.total += x
        terminated, truncated = self.total >= 30, self.t >= self.limit
        info = {"won": terminated, "pid": os.getpid(), "admissible_commands": COMMANDS}
        return f"{action} -> {x} (total {self.total})", float(x), terminated, truncated and not terminated, info


class SnapshotCounterEnv(CounterEnv):
    """Forks by snapshot/restore (its whole state is the rng state and two counters)."""

    def snapshot(self):
        return self.rng.getstate(), self.total, self.t

    def restore(self, state):
        rng_state, self.total, self.t = state
        self.rng = random.Random()
        self.rng.setstate(rng_state)


class NoisyEnv(CounterEnv):
    """Ignores the reset seed: a replay never reproduces it."""

    def _rng(self, seed):
        return random.Random(os.urandom(8))


class NoisySnapshotEnv(NoisyEnv, SnapshotCounterEnv):
    """Not replayable, but forkable by snapshot."""


class NoisyStepEnv(CounterEnv):
    """Resets as seeded, but each step's observation carries fresh noise: a replay diverges later."""

    def step(self, action):
        observation, *rest = super().step(action)
        return f"{observation} [{os.urandom(4).hex()}]", *rest


register("pool-counter", "tests.environments.pool_envs:CounterEnv")
register("pool-snapshot", "tests.environments.pool_envs:SnapshotCounterEnv")
register("pool-noisy", "tests.environments.pool_envs:NoisyEnv")
register("pool-noisy-snapshot", "tests.environments.pool_envs:NoisySnapshotEnv")
register("pool-noisy-step", "tests.environments.pool_envs:NoisyStepEnv")
