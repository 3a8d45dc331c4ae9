"""Many TextEnvs behind integer handles, reset and stepped a batch at a time, in worker processes
or in this process.

Why processes: simulators are not thread-safe (TextWorld's PddlEnv), some are one JVM each
(ScienceWorld), and a simulator that hangs or crashes must not take the run down with it.
Each worker is a process (forkserver by default) that hosts several envs and runs in its own
session, so that killing it also kills what it started (a JVM). A batch goes out as one message
per worker; replies come back one per request as they are done, so workers run in parallel and
the parent reads whichever answers first.

Failures stay with their env. An env that raises gives an `EnvError("env_error", ...)` in its
slot, never an exception. A worker that dies, or is silent for longer than the timeout of the
request it is on (`step_timeout` for steps, `reset_timeout` for everything else), is killed and
replaced by a fresh one: that request gets `EnvError("timeout" or "env_error")`, every other env
it hosted is lost (`env_error`, saying why), and every other worker's results stand.

`workers=0` runs the same host code in this process: no pickling, no isolation, no timeouts
(a hung step hangs the caller). It is the fastest choice for cheap envs such as TextWorld.

`fork_many` clones episodes by `snapshot()/restore()` where the env has them, else by resetting
with the same seed and options and replaying the recorded actions, checking every observation.
A snapshot crosses processes pickled: it must not share mutable state with its env.

Closed envs are kept per worker and reused by the next `open` with the same env id and kwargs
(a new JVM costs seconds); `reuse=False` closes them instead. An env that raised is never reused.

Workers start on first use, by forkserver: as with any multiprocessing start method but fork, a
script that uses them needs the `if __name__ == "__main__":` guard. `open` sends the env's
registry entry along, so ids registered at run time work in workers if their factory imports.

What it does not know: models, tokens, episodes; `EnvError.reason` names the stop reason.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import signal
import time
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from typing import Any

from environments import base


@dataclass(frozen=True)
class EnvError:
    """Stands in a batch's slot for an env that failed; `reason` is the episode's stop reason."""

    reason: str  # "env_error" (the env raised, its worker died, or it was lost) | "timeout"
    message: str


class ForkError(RuntimeError):
    """A fork could not be made (snapshot failed, or the replay diverged from the record)."""


# -- the envs of one process ----------------------------------------------------------------------


class _Host:
    """The envs of one process, by handle: the worker side of the pool (and the in-process pool)."""

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self.envs: dict[int, tuple[str, base.TextEnv]] = {}  # handle -> (reuse key, env)
        self.idle: dict[str, list[base.TextEnv]] = defaultdict(list)
        self.broken: set[int] = set()

    def run(self, op: str, handle: int, args: tuple) -> Any:
        try:
            return getattr(self, op)(handle, *args)
        except Exception:
            self.broken.add(handle)
            raise

    def reset(self, handle: int, spec: tuple, seed: int | None, options: dict | None) -> tuple:
        if handle not in self.envs:  # built on first reset: envs of a batch start in parallel
            key = _spec_key(spec)
            env_id, entry, kwargs = spec
            if self.idle[key]:
                env = self.idle[key].pop()
            else:
                base.register(env_id, entry)  # a worker's registry starts with the built-in ids only
                env = base.make(env_id, **kwargs)
            self.envs[handle] = (key, env)
        env = self.envs[handle][1]
        observation, info = env.reset(seed=seed, options=options)
        return observation, info, getattr(env, "task", "") or "", list(getattr(env, "tools", None) or [])

    def step(self, handle: int, action: str) -> tuple:
        return tuple(self.envs[handle][1].step(action))

    def snapshot(self, handle: int) -> tuple[bool, Any]:
        try:
            return True, self.envs[handle][1].snapshot()
        except NotImplementedError:
            return False, None

    def restore(self, handle: int, state: Any) -> None:
        self.envs[handle][1].restore(state)

    def walkthrough(self, handle: int) -> list[str] | None:
        return self.envs[handle][1].walkthrough()

    def close(self, handle: int) -> None:
        key, env = self.envs.pop(handle, (None, None))
        if env is not None and self.reuse and handle not in self.broken:
            self.idle[key].append(env)
        elif env is not None:
            _quietly_close(env)
        self.broken.discard(handle)

    def close_all(self) -> None:
        for handle in list(self.envs):
            self.broken.add(handle)
            self.close(handle)
        for env in (env for envs in self.idle.values() for env in envs):
            _quietly_close(env)
        self.idle.clear()


def _spec_key(spec: tuple) -> str:
    env_id, entry, kwargs = spec
    return json.dumps([env_id, repr(entry), kwargs], sort_keys=True, default=repr)


def _quietly_close(env: base.TextEnv) -> None:
    try:
        env.close()
    except Exception:  # noqa: BLE001 - a crashed simulator may not close cleanly; it is gone either way
        pass


def _worker_main(conn: Any, reuse: bool) -> None:
    """A worker: read a batch, answer each request as soon as it is done, until told to stop."""
    os.setsid()  # its own process group: the pool kills the worker and whatever it started
    host = _Host(reuse)
    try:
        while (batch := conn.recv()) is not None:
            for index, op, handle, args in batch:
                try:
                    conn.send((index, True, host.run(op, handle, args)))
                except Exception as exc:  # noqa: BLE001 - every failure goes back as text
                    conn.send((index, False, _describe(exc)))
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        host.close_all()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- worker processes -----------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: Any = None
    conn: Any = None

    def start(self, context: Any, reuse: bool) -> None:
        parent, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(child, reuse), name=f"entrorl-env-worker-{self.index}"
        )
        self.process.start()
        child.close()
        self.conn = parent

    def describe(self) -> str:
        return f"env worker {self.index} (pid {self.process.pid})"

    def kill(self) -> None:
        """SIGKILL the worker's process group (the worker and e.g. its JVMs), then reap it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # not yet in its own group, or gone
            self.process.kill()
        self.process.join()
        self.conn.close()


def _shutdown(workers: list[_Worker], host: _Host | None) -> None:
    """Ask every worker to stop, give it a moment, then kill what is left (at exit or on close)."""
    workers[:] = [w for w in workers if w.process is not None]
    for worker in workers:
        try:
            worker.conn.send(None)
        except (OSError, ValueError):
            pass
    for worker in workers:
        worker.process.join(timeout=5)
        worker.kill()  # also reaps anything the worker left running in its group
    workers.clear()
    if host is not None:
        host.close_all()


# -- the pool -------------------------------------------------------------------------------------


@dataclass
class _Record:
    """What the parent knows of one env: where it lives and how its episode got where it is."""

    spec: tuple  # (env_id, registry entry point, kwargs)
    worker: int | None  # None: in-process
    seed: int | None = None
    options: dict | None = None
    start: str | None = None  # the reset observation
    task: str = ""
    tools: list[dict] = field(default_factory=list)  # the env's JSON-schema tool specs
    steps: list[tuple] = field(default_factory=list)  # (action, observation, reward, terminated, truncated)


class EnvPool:
    """Envs behind handles: `open` -> `reset_many` -> `step_many`... -> `close_many`; `close()`
    (or the `with` block, or interpreter exit) stops the workers."""

    def __init__(
        self,
        workers: int = 0,
        step_timeout: float | None = 60.0,
        reset_timeout: float | None = 300.0,
        context: str = "forkserver",
        reuse: bool = True,
    ):
        if workers < 0:
            raise ValueError(f"workers={workers}: use 0 (in-process) or a positive number of processes")
        self.step_timeout, self.reset_timeout, self.reuse = step_timeout, reset_timeout, reuse
        self._context = mp.get_context(context)
        self._workers = [_Worker(i) for i in range(workers)]  # started on first use
        self._host = None if workers else _Host(reuse)
        self._records: dict[int, _Record] = {}
        self._lost: dict[int, str] = {}  # handle -> why its env is gone
        self._load: Counter = Counter()  # worker index -> live handles
        self._ids = itertools.count()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._host)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (killing those that do not stop) and close every env."""
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers (empty in-process or before first use)."""
        return [w.process.pid for w in self._workers if w.process is not None]

    # -- episodes ---------------------------------------------------------------------------------

    def open(self, env_id: str, kwargs: dict | None = None) -> int:
        """A handle for a new env of `env_id`, placed on the least loaded worker. The env is built
        in its worker at its first reset (so a batch of builds runs in parallel); a build error
        comes back from that reset."""
        if not self._finalizer.alive:
            raise RuntimeError("this EnvPool is closed")
        if env_id not in base.registered_ids():
            raise KeyError(f"unknown env id {env_id!r}; registered ids: {', '.join(base.registered_ids())}")
        # The registry entry travels with the request: a worker's registry holds only the built-in
        # ids, and an id registered at run time (a callable, or a test's env) must reach it too.
        spec = (env_id, base._REGISTRY[env_id], dict(kwargs or {}))
        return self._place(spec)

    def reset_many(
        self, handles: list[int], seeds: list[int | None] | None = None, options: list[dict | None] | None = None
    ) -> list[tuple[str, dict] | EnvError]:
        """`(observation, info)` or an EnvError per handle."""
        seeds = seeds or [None] * len(handles)
        options = options or [None] * len(handles)
        results = self._run(
            [(h, "reset", (self._records[h].spec, s, o)) for h, s, o in zip(handles, seeds, options, strict=True)]
        )
        out = []
        for handle, seed, opts, result in zip(handles, seeds, options, results, strict=True):
            if isinstance(result, EnvError):
                out.append(result)
                continue
            observation, info, task, tools = result
            record = self._records[handle]
            record.seed, record.options, record.start, record.task, record.steps = seed, opts, observation, task, []
            record.tools = tools
            out.append((observation, info))
        return out

    def step_many(self, handles: list[int], actions: list[str]) -> list[tuple | EnvError]:
        """`(observation, reward, terminated, truncated, info)` or an EnvError per handle; never
        raises for one bad env."""
        results = self._run([(h, "step", (a,)) for h, a in zip(handles, actions, strict=True)])
        for handle, action, result in zip(handles, actions, results, strict=True):
            if not isinstance(result, EnvError):
                self._records[handle].steps.append((action, *result[:4]))
        return results

    def walkthrough_many(self, handles: list[int]) -> list[list[str] | None | EnvError]:
        """Each env's `walkthrough()` from the state its last reset made."""
        return self._run([(h, "walkthrough", ()) for h in handles])

    def close_many(self, handles: list[int]) -> None:
        """Close (or keep for reuse) the envs and forget the handles; errors are ignored."""
        self._run([(h, "close", ()) for h in handles if h in self._records])
        for handle in handles:
            record = self._records.pop(handle, None)
            if record is not None and handle not in self._lost:
                self._load[record.worker] -= 1
            self._lost.pop(handle, None)

    def task(self, handle: int) -> str:
        """The env's `task` attribute as of its last reset ("" if it has none)."""
        return self._records[handle].task

    def tools(self, handle: int) -> list[dict]:
        """The env's `tools` (JSON-schema specs) as of its last reset."""
        return self._records[handle].tools

    def history(self, handle: int) -> list[str]:
        """The actions stepped since the last reset."""
        return [step[0] for step in self._records[handle].steps]

    # -- forks ------------------------------------------------------------------------------------

    def fork(self, handle: int) -> int:
        """A new handle whose env is in the same state as `handle`'s (see `fork_many`)."""
        (result,) = self.fork_many([handle])
        if isinstance(result, EnvError):
            raise ForkError(result.message)
        return result

    def fork_many(self, handles: list[int], at_steps: list[int | None] | None = None) -> list[int | EnvError]:
        """Clone each env at its current state, in parallel: reset a new env with the source's seed
        and options, then `restore` the source's `snapshot()` where the env has one, else replay
        the recorded actions, checking each observation, reward and flag against the record.
        `at_steps[i]` (not None) clones env i as it was after its first k steps instead (always
        by replay: a snapshot holds only the current state). A new handle, or an EnvError saying
        why, per source."""
        n = len(handles)
        at = at_steps or [None] * n
        sources = [
            self._records[h] if k is None else replace(self._records[h], steps=self._records[h].steps[:k])
            for h, k in zip(handles, at, strict=True)
        ]
        forks = [self._place(source.spec) for source in sources]
        failed: dict[int, EnvError] = {}  # position -> why that fork could not be made
        # One batch: every current-state source's snapshot, every fork's reset.
        asked = [i for i in range(n) if at[i] is None]
        first = self._run([(handles[i], "snapshot", ()) for i in asked] +
                          [(f, "reset", (s.spec, s.seed, s.options)) for f, s in zip(forks, sources, strict=True)])  # fmt: skip
        snapshots: list = [(False, None)] * n
        for i, result in zip(asked, first[: len(asked)], strict=True):
            snapshots[i] = result
        starts = first[len(asked) :]
        for i in range(n):
            error = next((r for r in (snapshots[i], starts[i]) if isinstance(r, EnvError)), None)
            if error is not None:
                failed[i] = EnvError("env_error", f"fork of env {handles[i]}: {error.message}")
            elif not snapshots[i][0] and starts[i][0] != sources[i].start:
                failed[i] = self._diverged(handles[i], 0, "reset", sources[i].start, starts[i][0])
        by_snapshot = [i for i in range(n) if i not in failed and snapshots[i][0]]
        restored = self._run([(forks[i], "restore", (snapshots[i][1],)) for i in by_snapshot])
        for i, result in zip(by_snapshot, restored, strict=True):
            if isinstance(result, EnvError):
                failed[i] = EnvError("env_error", f"fork of env {handles[i]}: restore failed: {result.message}")
        self._replay(handles, sources, forks, [i for i in range(n) if i not in failed and not snapshots[i][0]], failed)
        for i in set(range(n)) - set(failed):  # the fork's record: where it lives, the source's story
            self._records[forks[i]] = replace(sources[i], worker=self._records[forks[i]].worker,
                                              steps=list(sources[i].steps))  # fmt: skip
        self.close_many([forks[i] for i in failed])
        return [failed.get(i, fork) for i, fork in enumerate(forks)]

    def _replay(self, handles: list[int], sources: list[_Record], forks: list[int], todo: list[int],
                failed: dict[int, EnvError]) -> None:  # fmt: skip
        """Step the forks in `todo` through their sources' actions, all forks one step per batch."""
        for k in itertools.count():
            todo = [i for i in todo if i not in failed and k < len(sources[i].steps)]
            if not todo:
                return
            steps = [sources[i].steps[k] for i in todo]
            results = self._run([(forks[i], "step", (step[0],)) for i, step in zip(todo, steps, strict=True)])
            for i, step, result in zip(todo, steps, results, strict=True):
                if isinstance(result, EnvError):
                    failed[i] = EnvError("env_error", f"fork of env {handles[i]}: replay step {k}: {result.message}")
                elif tuple(result[:4]) != step[1:]:
                    failed[i] = self._diverged(handles[i], k + 1, repr(step[0]), step[1:], tuple(result[:4]))

    @staticmethod
    def _diverged(handle: int, k: int, what: str, recorded: Any, replayed: Any) -> EnvError:
        return EnvError(
            "env_error",
            f"fork of env {handle} by replay diverged at step {k} ({what}): recorded {recorded!r:.300}, "
            f"replay gave {replayed!r:.300}. The env is not deterministic under reset(seed, options) "
            "plus the same actions; give it snapshot()/restore() to fork it.",
        )

    # -- dispatch ---------------------------------------------------------------------------------

    def _place(self, spec: tuple) -> int:
        handle = next(self._ids)
        worker = min(range(len(self._workers)), key=lambda i: (self._load[i], i)) if self._workers else None
        self._records[handle] = _Record(spec, worker)
        self._load[worker] += 1
        return handle

    def _run(self, requests: list[tuple[int, str, tuple]]) -> list[Any]:
        """Run `(handle, op, args)` requests; a result or an EnvError per request, in order."""
        results: list[Any] = [None] * len(requests)
        queues: dict[int, list[int]] = defaultdict(list)
        for i, (handle, op, args) in enumerate(requests):
            if handle in self._lost:
                results[i] = None if op == "close" else EnvError("env_error", self._lost[handle])
            elif self._host is not None:
                try:
                    results[i] = self._host.run(op, handle, args)
                except Exception as exc:  # noqa: BLE001 - one env's failure is that env's result
                    results[i] = EnvError("env_error", _describe(exc))
            else:
                queues[self._records[handle].worker].append(i)
        if queues:
            self._collect(requests, queues, results)
        return results

    def _collect(self, requests: list, queues: dict[int, list[int]], results: list) -> None:
        """Send each worker its share, then read replies as they come until every request has a
        result; kill and replace a worker that dies or overruns the request it is on."""
        pending: dict[int, list[int]] = {}
        since: dict[int, float] = {}
        for w, indices in queues.items():
            worker = self._started(w)
            try:
                worker.conn.send([(i, requests[i][1], requests[i][0], requests[i][2]) for i in indices])
            except OSError:
                self._fail(worker, indices, results, "env_error", f"{worker.describe()} was gone")
                continue
            pending[w], since[w] = list(indices), time.monotonic()
        while pending:
            deadlines = [since[w] + t for w in pending if (t := self._timeout(requests[pending[w][0]][1])) is not None]
            workers = [self._workers[w] for w in pending]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            wait([x.conn for x in workers] + [x.process.sentinel for x in workers], timeout)
            for worker in workers:
                queue = pending[worker.index]
                answered = len(queue)
                gone = self._drain(worker, queue, results)
                if len(queue) < answered:
                    since[worker.index] = time.monotonic()  # the next request's clock starts now
                limit = self._timeout(requests[queue[0]][1]) if queue else None
                if queue and (gone or not worker.process.is_alive()):
                    worker.process.join()
                    why = f"{worker.describe()} died (exit code {worker.process.exitcode})"
                    self._fail(worker, queue, results, "env_error", why)
                elif queue and limit is not None and time.monotonic() - since[worker.index] >= limit:
                    why = f"{worker.describe()} timed out: {requests[queue[0]][1]} took over {limit} s"
                    self._fail(worker, queue, results, "timeout", why)
                if not queue:
                    del pending[worker.index]

    @staticmethod
    def _drain(worker: _Worker, queue: list[int], results: list) -> bool:
        """Read every reply waiting from `worker` into `results`; True if its pipe is closed."""
        while queue and worker.conn.poll():
            try:
                i, ok, value = worker.conn.recv()
            except (EOFError, OSError):
                return True
            results[i] = value if ok else EnvError("env_error", value)
            queue.remove(i)
        return False

    def _timeout(self, op: str) -> float | None:
        return self.step_timeout if op == "step" else self.reset_timeout

    def _fail(self, worker: _Worker, indices: list[int], results: list, reason: str, why: str) -> None:
        """Kill and replace `worker`: the request it was on gets `reason`, its other requests and
        envs are lost with `env_error`."""
        worker.kill()
        worker.start(self._context, self.reuse)
        current = indices[0] if indices else None
        for i in indices:
            results[i] = EnvError(reason if i == current else "env_error",
                                  why if i == current else f"lost with its worker: {why}")  # fmt: skip
        for handle, record in self._records.items():
            if record.worker == worker.index and handle not in self._lost:
                self._lost[handle] = f"lost with its worker: {why}"
        self._load[worker.index] = 0
        indices.clear()

    def _started(self, w: int) -> _Worker:
        worker = self._workers[w]
        if worker.process is None:
            worker.start(self._context, self.reuse)
        return worker
