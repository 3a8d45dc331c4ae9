"""Run model-written Python in a separate, locked-down process; run functions under hard timeouts.

`PythonSession` is one persistent interpreter per episode: variables survive between calls and a
final bare expression is echoed, as in a notebook. Cells that ran cleanly are kept; after a crash,
a hard timeout or a `restore`, a fresh interpreter replays them silently, so state survives those
too (an episode snapshot is just its list of cells). `TimeoutPool` runs `module:function` calls in
worker processes and kills any that overrun: math-verify's own timeouts use `signal.alarm`, which
fails outside the main thread.

This is the host side. A worker runs environments/sandbox_worker.py as its `__main__`: it locks
itself down in layers (namespaces, rlimits, seccomp, Landlock, an audit hook; listed there) before
its first request, and `PythonSession.isolation` reports which layers held. The boundary is the
kernel: the audit hook is a courtesy (clear messages), not a wall.

The worker is its own process group (killed whole on a hard timeout), runs in a private temp dir
(cwd and HOME, removed on close) and caps its output itself. A cell that ends in a `MemoryError`
recycles the worker: the memory it took is returned, the cell is not kept, and the next call starts
a fresh interpreter that replays the clean cells. Nothing here imports project code but the
worker's file, which imports only the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from environments import sandbox_worker
from environments.sandbox_worker import SandboxError, _read_frame, _write_frame

GRACE = 1.0  # seconds past a call's own timeout before the host kills the worker
STARTUP_TIMEOUT = 60.0  # a loaded 2-core machine can take seconds to start an interpreter


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds per call (in-process alarm; the host kills GRACE s later)
    cpu_seconds: float = 10.0  # CPU seconds per call (ITIMER_PROF in the worker)
    lifetime_cpu_seconds: int = 300  # RLIMIT_CPU: all calls of one interpreter together
    memory_mb: int = 1024  # RLIMIT_AS of the worker (the interpreter itself needs ~30 MB; numpy ~100)
    max_output: int = 8192  # characters of output per call; the rest is cut and the cell stopped
    max_file_mb: int = 16  # RLIMIT_FSIZE: the largest file the code may write
    max_disk_mb: int = 64  # size of the worker's private tmpfs (its cwd): all its files together
    max_code: int = 100_000  # characters per cell
    python_guard: bool = True  # the audit hook; off only to test the kernel layers on their own


@dataclass
class ExecResult:
    output: str  # printed output, then the traceback if the cell raised (as a REPL shows them)
    error: str | None = None  # one line, e.g. "TimeoutError: execution exceeded 5 s"; None if clean
    restarted: bool = False  # the interpreter died or was recycled (e.g. after a MemoryError); the
    # next call starts a fresh one, which replays the clean cells

    def text(self) -> str:
        """Observation text: the output, and the error line where the output does not end with it."""
        out = self.output.rstrip("\n")
        if self.error and not out.endswith(self.error):
            out = f"{out}\n{self.error}" if out else self.error
        return out or "(no output)"


# -- host side: one worker process ----------------------------------------------------------------


class _WorkerLost(Exception):
    def __init__(self, timed_out: bool, returncode: int | None):
        super().__init__("timed out" if timed_out else f"exited with {returncode}")
        self.timed_out, self.returncode = timed_out, returncode


class _Worker:
    """A child running sandbox_worker.py's `_worker_main`, in its own session, spoken to over its stdio."""

    def __init__(self, config: dict, cwd: str | None = None, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(sandbox_worker.__file__), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        try:
            self.ready = self._receive(time.monotonic() + STARTUP_TIMEOUT)
        except _WorkerLost as lost:
            raise SandboxError(f"worker failed to start ({lost})") from None
        if "setup_error" in self.ready:
            self.kill()
            raise SandboxError(f"worker failed to start: {self.ready['setup_error']}")

    def request(self, message: dict, timeout: float) -> dict:
        """Send `message`, wait up to `timeout` s for the reply; kill the worker and raise
        `_WorkerLost` when it overruns, dies or garbles its reply."""
        try:
            _write_frame(self.proc.stdin.fileno(), message)
        except OSError:
            self.kill()
            raise _WorkerLost(False, self.proc.returncode) from None
        return self._receive(time.monotonic() + timeout)

    def _receive(self, deadline: float) -> dict:
        try:
            reply = _read_frame(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            self.kill()
            raise _WorkerLost(True, None) from None
        except (EOFError, OSError, ValueError, SandboxError):
            self.kill()
            raise _WorkerLost(False, self.proc.returncode) from None
        if not isinstance(reply, dict):
            self.kill()
            raise _WorkerLost(False, None)
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _describe_loss(lost: _WorkerLost, limits: Limits) -> str:
    if lost.timed_out:
        return f"TimeoutError: execution exceeded {limits.timeout:g} s; the interpreter was restarted"
    code = lost.returncode
    if code == -signal.SIGXCPU:
        return f"TimeoutError: the interpreter used up its {limits.lifetime_cpu_seconds} CPU seconds and was restarted"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the interpreter was killed ({name}, e.g. out of memory) and restarted"
    return f"the interpreter exited (code {code}) and was restarted"


# -- host side: the python tool --------------------------------------------------------------------


class PythonSession:
    """A persistent, sandboxed Python interpreter, started at the first `run`.

    `cells` are the cells that ran without error, in order; a fresh interpreter replays them
    (silently) before the next call, so `PythonSession(limits, cells=old.cells)` restores state.
    """

    def __init__(self, limits: Limits | None = None, cells: Iterable[str] = ()):
        self.limits = limits or Limits()
        self.cells = list(cells)
        self.isolation: dict[str, str] = {}
        self._worker: _Worker | None = None
        self._tmp: str | None = None
        self._finalizer = weakref.finalize(self, _cleanup, [None, None])

    def run(self, code: str) -> ExecResult:
        if not isinstance(code, str):
            return ExecResult("", f"TypeError: code must be a string, got {type(code).__name__}")
        if len(code) > self.limits.max_code:
            return ExecResult(
                "", f"error: code of {len(code)} characters exceeds the limit of {self.limits.max_code}"
            )
        try:
            worker = self._started()
            reply = worker.request({"code": code}, self.limits.timeout + GRACE)
        except SandboxError as exc:
            self._stop()
            return ExecResult("", f"SandboxError: {exc}", restarted=True)
        except _WorkerLost as lost:
            self._stop()
            return ExecResult("", _describe_loss(lost, self.limits), restarted=True)
        if "setup_error" in reply:
            self._stop()
            return ExecResult("", f"SandboxError: {reply['setup_error']}", restarted=True)
        if reply.get("recycle"):  # a MemoryError: what the cell took goes back with the interpreter
            self._stop()
            return ExecResult(str(reply.get("output", "")), reply.get("error"), restarted=True)
        if reply.get("error") is None:
            self.cells.append(code)
        return ExecResult(str(reply.get("output", "")), reply.get("error"))

    def _started(self) -> _Worker:
        while self._worker is None:
            self._start()
            for i, cell in enumerate(self.cells):  # replay; a cell that raises now is kept
                try:
                    self._worker.request({"code": cell, "silent": True}, self.limits.timeout + GRACE)
                except _WorkerLost:  # it hangs or kills the interpreter now: forget it and what follows
                    self._stop()
                    self.cells = self.cells[:i]
                    break
        return self._worker

    def _start(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="entrorl-py-")
        config = {"mode": "python", "limits": asdict(self.limits), "tmp": self._tmp}
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": self._tmp,
            "TMPDIR": self._tmp,
            "LANG": "C.UTF-8",
            "MPLBACKEND": "Agg",
            **{k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        }
        self._finalizer.detach()
        state = [None, self._tmp]
        self._finalizer = weakref.finalize(self, _cleanup, state)
        self._worker = state[0] = _Worker(config, cwd=self._tmp, env=env)
        self.isolation = self._worker.ready.get("isolation", {})

    def _stop(self) -> None:
        self._finalizer()  # kills the worker and removes the temp dir
        self._worker = self._tmp = None

    def close(self) -> None:
        self._stop()


def _cleanup(state: list) -> None:
    worker, tmp = state
    if worker is not None:
        worker.kill()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def run_python(code: str, limits: Limits | None = None) -> ExecResult:
    """One cell in a fresh interpreter (stateless)."""
    session = PythonSession(limits)
    try:
        return session.run(code)
    finally:
        session.close()


# -- host side: functions under hard timeouts -------------------------------------------------------


@dataclass(frozen=True)
class CallResult:
    value: Any = None
    timed_out: bool = False
    error: str | None = None  # the worker's exception, or why it could not start


class TimeoutPool:
    """Calls `function` ("module:name", JSON arguments and result) in worker processes, each call
    under a hard timeout: a worker that overruns is killed and replaced by a fresh one at the next
    call. Thread-safe; workers start lazily; `map` keeps all of them busy."""

    def __init__(
        self, function: str, workers: int = 2, memory_mb: int | None = 2048, preload: Sequence[str] = ()
    ):
        self.config = {
            "mode": "call",
            "function": function,
            "memory_mb": memory_mb,
            "preload": list(preload),
            "sys_path": [p for p in sys.path if p],
        }
        self.workers = workers
        self._slots: list[_Worker | None] = [None] * workers
        self._free = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer = weakref.finalize(self, _close_workers, self._slots)

    def call(self, *args: Any, timeout: float) -> CallResult:
        with self._free:
            with self._lock:
                index = next(i for i, w in enumerate(self._slots) if w is not _BUSY)
                worker, self._slots[index] = self._slots[index], _BUSY
            try:
                if worker is None:
                    worker = _Worker(self.config)
                reply = worker.request({"args": list(args)}, timeout)
                result = CallResult(reply.get("value"), error=reply.get("error"))
            except SandboxError as exc:
                worker, result = None, CallResult(error=str(exc))
            except _WorkerLost as lost:
                worker = None
                result = CallResult(
                    timed_out=lost.timed_out, error=None if lost.timed_out else f"worker {lost}"
                )
            finally:
                with self._lock:
                    self._slots[index] = worker
            return result

    def map(self, calls: Iterable[Sequence[Any]], timeout: float) -> list[CallResult]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="timeout-pool")
        return list(self._executor.map(lambda args: self.call(*args, timeout=timeout), calls))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._finalizer()


_BUSY = object()  # a slot whose worker is out on a call; None is a slot with no worker yet


def _close_workers(slots: list) -> None:
    for worker in slots:
        if isinstance(worker, _Worker):
            worker.kill()

