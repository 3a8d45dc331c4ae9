"""The python sandbox and the timeout pool (environments/sandbox.py).

Every escape the model's code might try is contained and comes back as text; the host survives.
One interpreter serves most tests (state carries between them where noted); a few more start
their own. Limits are small so that each containment takes at most ~2 s.

The kernel is the boundary, not the audit hook: the escape tests also run with the hook first
disabled by the model's own code (BYPASS) and with it off, and must hold either way.

Run: .venv/bin/python -m pytest tests/environments/test_sandbox.py -q
"""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from environments.sandbox import ExecResult, Limits, PythonSession, TimeoutPool, run_python

LIMITS = Limits(timeout=1.5, cpu_seconds=1.5, memory_mb=512, max_output=1000)

# model-written code that disables the audit hook: find the hook function, give it a no-op's code
BYPASS = """\
import gc
hook = next(o for o in gc.get_objects() if getattr(o, "__qualname__", "") == "_audit_hook.<locals>.hook")
free = hook.__code__.co_freevars  # the no-op needs as many closure cells
ns = {}
exec("def make():\\n" + "".join(f" {v} = 0\\n" for v in free)
     + " def hook(event, args):\\n  return (" + "".join(f"{v}, " for v in free) + ")\\n return hook", ns)
hook.__code__ = ns["make"]().__code__
"""
CTYPES = "import ctypes\nctypes.CDLL(None) is not None"  # blocked by the audit hook alone
FILL = "for n in range(32):\n    with open(f'fill{n}', 'wb') as f:\n        f.write(bytes(4 << 20))"  # 128 MB


def _session(guard: str, **limits) -> PythonSession:
    """guard: "on" (the audit hook), "bypassed" (on, then disabled by the model's code), "off"."""
    limits = {"timeout": 3, "cpu_seconds": 3, "memory_mb": 256, **limits}
    session = PythonSession(Limits(python_guard=guard != "off", **limits))
    if guard == "bypassed":
        assert "blocked: ctypes is disabled" in session.run(CTYPES).error
        assert session.run(BYPASS).error is None
        assert session.run(CTYPES).text() == "True", "the bypass did not get past the audit hook"
    return session


@pytest.fixture
def host_socket(tmp_path_factory):
    """A listening unix socket on the host; yields its path and what reached it."""
    path = str(tmp_path_factory.mktemp("unix") / "host.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    server.settimeout(0.2)
    received, stop = [], threading.Event()

    def serve():
        while True:
            try:
                conn, _ = server.accept()  # a connection made before `stop` is still in the backlog
            except TimeoutError:
                if stop.is_set():
                    return
                continue
            with conn:
                conn.settimeout(2)
                received.append(b"(connected)")
                try:
                    received.append(conn.recv(1024))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def reached() -> list[bytes]:
        stop.set()
        thread.join(10)
        return received

    yield path, reached
    stop.set()
    thread.join(10)
    server.close()


@pytest.fixture(scope="module")
def py():
    session = PythonSession(LIMITS)
    yield session
    session.close()


def test_state_persists_and_a_final_expression_is_echoed(py):
    assert py.run("x = 6\nx * 7") == ExecResult("42\n")
    assert py.run("print(x + 1)") == ExecResult("7\n")
    assert py.run("y = None\ny").text() == "(no output)"
    assert "x = 6\nx * 7" in py.cells


def test_errors_are_text_with_the_cell_traceback(py):
    result = py.run("def f():\n    return 1 / 0\nf()")
    assert result.error == "ZeroDivisionError: division by zero"
    assert "<cell" in result.output and "return 1 / 0" in result.output
    assert "sandbox.py" not in result.output  # the worker's own frames are hidden
    assert py.run("def g(:").error == "SyntaxError: invalid syntax"


@pytest.mark.parametrize(
    "code, blocked",
    [
        ("import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)", "network access is disabled"),
        ("import urllib.request; urllib.request.urlopen('http://example.com')", "network access is disabled"),
        ("open('/etc/hostname').read()", "file access outside the working directory"),
        ("open('/tmp/entrorl-escape', 'w').write('x')", "file access outside the working directory"),
        ("import os; os.listdir('/')", "file access outside the working directory"),
        ("import os\nwhile True:\n    os.fork()", "starting processes is disabled"),  # a fork bomb
        ("import subprocess; subprocess.run(['ls'])", "starting processes is disabled"),
        ("import os; os.kill(1, 0)", "signalling other processes is disabled"),
        ("import ctypes; ctypes.CDLL(None)", "ctypes is disabled"),
        ("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "resource limits are fixed"),
    ],
)
def test_escapes_are_blocked_with_a_clear_message(py, code, blocked):
    result = py.run(code)
    assert f"blocked: {blocked}" in result.error, result.text()  # urllib wraps it in a URLError
    assert not result.restarted
    assert not os.path.exists("/tmp/entrorl-escape")


def test_files_inside_the_working_directory_work(py):
    assert py.run("open('notes.txt', 'w').write('hi'); open('notes.txt').read()").text() == "'hi'"
    assert py.run("import os; os.listdir('.')").text() == "['notes.txt']"


def test_numpy_and_sympy_work_under_the_default_limits():
    session = PythonSession(Limits(timeout=60, cpu_seconds=60))  # generous: a loaded machine imports slowly
    try:
        result = session.run("import numpy as np, sympy\nint(np.arange(4).sum()), sympy.factor('x**2-1')")
        assert result.text() == "(6, (x - 1)*(x + 1))"
    finally:
        session.close()


def test_an_endless_loop_times_out_and_state_survives(py):
    py.run("z = 11")
    for code in ("while True: pass", "import time; time.sleep(30)"):
        started = time.monotonic()
        result = py.run(code)
        assert result.error in (
            "TimeoutError: execution exceeded 1.5 s",
            "TimeoutError: CPU time exceeded 1.5 s",
        )
        assert not result.restarted and time.monotonic() - started < 1.5 + 2.0
    assert py.run("z").text() == "11"


def test_huge_allocations_raise_memory_error(py):
    assert py.run("b = bytearray(10**11)").error == "MemoryError: out of memory (limit 512 MB)"
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"
    result = py.run(grow)
    assert result.error == "MemoryError: out of memory (limit 512 MB)", result.text()
    assert result.restarted and grow not in py.cells  # recycled: the half-filled list is gone
    assert py.run("'chunks' in globals(), 1 + 1").text() == "(False, 2)"


def test_memory_taken_before_a_memory_error_is_returned():
    session = PythonSession(Limits(timeout=5, cpu_seconds=5, memory_mb=512))
    try:
        first_pid = session.run("import os\nkeep = bytearray(100 << 20)\nos.getpid()").text()
        result = session.run("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))")
        assert result.error == "MemoryError: out of memory (limit 512 MB)"
        assert result.restarted
        # 100 + 300 MB fit in 512 only if the ~400 MB of chunks were given back
        result = session.run("big = bytearray(300 << 20)\nlen(keep) >> 20, len(big) >> 20, os.getpid()")
        assert result.error is None, result.text()
        kept, big, pid = result.output.strip("()\n").split(", ")
        assert (kept, big) == ("100", "300") and pid != first_pid  # a fresh interpreter, cells replayed
        assert not any("chunks" in cell for cell in session.cells)
    finally:
        session.close()


def test_huge_prints_are_cut(py):
    for code in ("print('x' * 10**7)", "while True: print('spam')"):
        result = py.run(code)
        assert result.error == "OutputLimitExceeded: output exceeded 1000 characters; the cell was stopped"
        assert len(result.output) <= 1000


def test_a_hang_in_c_code_is_killed_and_clean_cells_replayed():
    session = PythonSession(Limits(timeout=1, cpu_seconds=1, memory_mb=256))
    try:
        session.run("kept = 5")
        session.run("1 / 0")  # raised: not replayed
        started = time.monotonic()
        result = session.run("sum(range(10**13))")  # C code: no signal handler runs, the host kills it
        assert result.restarted and result.error.startswith("TimeoutError: execution exceeded 1 s")
        assert time.monotonic() - started < 4
        assert session.run("kept").text() == "5"
        assert session.cells == ["kept = 5", "kept"]
    finally:
        session.close()


def test_model_code_can_disable_the_audit_hook():
    """The threat the kernel layers are for: one cell switches the Python guard off."""
    session = _session("on")
    try:
        assert "blocked: ctypes is disabled" in session.run(CTYPES).error
        assert session.run(BYPASS).error is None
        assert session.run(CTYPES).text() == "True"
        assert (
            session.run("import os; os.listdir('/')").error
            == "PermissionError: [Errno 13] Permission denied: '/'"
        )
    finally:
        session.close()


@pytest.mark.parametrize("guard", ["on", "bypassed"])
def test_a_host_unix_socket_is_out_of_reach(host_socket, guard):
    path, reached = host_socket
    session = _session(guard)
    try:
        connect = (
            f"import socket\nc = socket.socket(socket.AF_UNIX)\nc.connect({path!r})\nc.sendall(b'escape')"
        )
        for code in (connect, "import socket\nsocket.socketpair()"):
            result = session.run(code)
            assert result.error is not None and result.error.startswith("PermissionError"), result.text()
            if guard == "bypassed":
                assert result.error == "PermissionError: [Errno 13] Permission denied"  # seccomp's answer
    finally:
        session.close()
    assert reached() == []


@pytest.mark.parametrize("guard", ["on", "bypassed"])
def test_disk_writes_are_capped_and_land_nowhere_on_the_host(guard):
    session = _session(guard)  # the default disk cap: 64 MB; each file stays under RLIMIT_FSIZE (16 MB)
    try:
        assert session.run("1").text() == "1"
        if session.isolation.get("disk", "").startswith("none"):
            pytest.skip(f"no private tmpfs here: {session.isolation}")
        too_big = session.run("open('big', 'wb').write(bytes(17 << 20))")  # RLIMIT_FSIZE stays
        assert "File too large" in too_big.error, too_big.text()
        result = session.run(FILL)
        assert result.error is not None and "No space left on device" in result.error, result.text()
        inside = session.run("import os\nsum(os.path.getsize(f) for f in os.listdir('.')) >> 20").text()
        assert 0 < int(inside) <= 64
        host = Path(session._tmp)  # the worker's cwd as the host sees it: the tmpfs is not there
        assert list(host.iterdir()) == [] and sum(p.stat().st_size for p in host.rglob("*")) == 0
        assert session.isolation["disk"] == "tmpfs 64 MB"
    finally:
        session.close()


@pytest.mark.parametrize("guard", ["off", "bypassed"])
def test_kernel_layers_hold_without_the_audit_hook(host_socket, guard):
    """With the Python-level guard off, or disabled by the model's own code, what the kernel
    enforces on this machine still holds."""
    path, reached = host_socket
    session = _session(guard, timeout=2, cpu_seconds=2)
    try:
        assert session.run("1").text() == "1"
        held = session.isolation
        unix = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
        checks = {
            "syscalls": [("import os; os.fork()", "Operation not permitted"), ("import os; os.kill(1, 0)", "Operation not permitted"),
                         (unix, "Permission denied"), ("import socket; socket.socketpair()", "Permission denied")],
            "files": [("open('/etc/hostname')", "Permission denied"), ("open('/tmp/entrorl-escape', 'w')", "Permission denied")],
            "network": [("import socket; socket.create_connection(('1.1.1.1', 80), timeout=1)", "Error")],
            "disk": [(FILL, "No space left on device")],
        }  # fmt: skip
        ran = 0
        for layer, cases in checks.items():
            if held.get(layer, "none").startswith("none"):
                continue
            for code, message in cases:
                result = session.run(code)
                assert result.error is not None and message in result.error, (layer, code, result.text())
                ran += 1
        if not ran:
            pytest.skip(f"no kernel layer available here: {held}")
    finally:
        session.close()
    assert not os.path.exists("/tmp/entrorl-escape")
    assert reached() == []


def test_cells_restore_state_in_a_new_session():
    session = PythonSession(LIMITS, cells=["import math", "r = math.isqrt(1369)"])
    try:
        assert session.run("r").text() == "37"
    finally:
        session.close()


def test_run_python_is_stateless_and_checks_its_input():
    assert run_python("print('once')").text() == "once"
    assert run_python("once").error == "NameError: name 'once' is not defined"
    assert (
        PythonSession(Limits(max_code=10))
        .run("x = 1 + 2 + 3 + 4")
        .error.startswith("error: code of 17 characters")
    )


def test_timeout_pool_kills_overruns_and_keeps_serving():
    pool = TimeoutPool("time:sleep", workers=2, memory_mb=None)
    try:
        slow, fast = pool.map([(30,), (0,)], timeout=1.0)
        assert slow.timed_out and slow.value is None and not fast.timed_out
        assert pool.call(0, timeout=5.0).timed_out is False  # a fresh worker replaced the killed one
        assert "TypeError" in pool.call("soon", timeout=5.0).error
    finally:
        pool.close()
    broken = TimeoutPool("no_such_module:f", workers=1)
    assert "No module named 'no_such_module'" in broken.call(timeout=5.0).error
