"""What runs inside a sandbox worker: its lockdown (namespaces, rlimits, seccomp, Landlock, the
audit hook) and its request loops (a python cell at a time, or one function's calls).

environments/sandbox.py, the host side, starts this file as a script in a child process of its
own (`python -I sandbox_worker.py CONFIG`, in its own session) and speaks to it over its stdin and
stdout in frames of a 4-byte length and JSON; the framing below serves both sides. It is one file
importing only the standard library, not a package of modules: under `-I` no project path is on
`sys.path`, whatever it imports is loaded in the interpreter that runs the model's code, and a
cell's traceback hides this file's frames (the loop, the guards) by its name.

A python worker is locked down in this order; `PythonSession.isolation` reports what held:

    layer                  enforced by          what it stops
    network namespace      kernel (root/userns) all IP networking: the namespace has only a down `lo`
    private tmpfs          kernel (root/userns) disk filling: cwd/HOME/TMPDIR are a tmpfs of
                                                `max_disk_mb` in a private mount namespace; what is
                                                written there lands nowhere on the host's disk
    rlimits                kernel               memory (AS), CPU seconds of the process, file size
    RLIMIT_NPROC = 0       kernel, non-root     new processes (uid 0 is exempt, hence seccomp)
    no capabilities        kernel               mount, raising hard limits, ... (uid 0 keeps its files)
    seccomp filter         kernel (x86_64)      fork/clone/exec, signals to other processes, ptrace,
                                                every socket (unix ones too) and socketpair, raising
                                                rlimits, namespaces, mounts, ...
    Landlock               kernel (>= 5.13)     files outside the temp dir; Python's own dirs and the
                                                system libraries stay readable
    audit hook             Python               all of the above first, with a clear message; the
                                                only file guard where Landlock is missing

The boundary is the kernel: the audit hook is a courtesy (clear messages), not a wall. The model's
own code can disable it (find the hook with `gc.get_objects()`, swap its `__code__`), so every
escape it stops must also be stopped by a kernel layer above; the tests try each one that way.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import sys
import time
from typing import Any


class SandboxError(RuntimeError):
    """The worker could not start, or its reply could not be read."""


# -- framing: 4-byte length + JSON, both directions ------------------------------------------------


def _write_frame(fd: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _read_frame(fd: int, deadline: float | None = None, max_bytes: int = 1 << 26) -> Any:
    (n,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    if n > max_bytes:
        raise SandboxError(f"worker reply of {n} bytes exceeds {max_bytes}")
    return json.loads(_read_exact(fd, n, deadline))


# -- isolation: locking this process down, before the first request --------------------------------

_CLONE_NEWNET, _CLONE_NEWUSER, _CLONE_NEWNS, _CLONE_THREAD = 0x40000000, 0x10000000, 0x00020000, 0x00010000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_SYSCALL_LANDLOCK_CREATE, _SYSCALL_LANDLOCK_ADD_RULE, _SYSCALL_LANDLOCK_RESTRICT = 444, 445, 446

# x86_64 syscalls refused outright (EPERM): process creation and exec, tracing, other processes'
# memory and signals, namespaces and mounts, rlimit raising, kernel/system state, io_uring (its
# requests would bypass this filter).
_DENY_X86_64 = (
    57, 58, 59, 322,  # fork vfork execve execveat
    101, 310, 311, 434, 424, 438,  # ptrace process_vm_readv/writev pidfd_open/send_signal/getfd
    160, 272, 308, 165, 166, 155, 161,  # setrlimit unshare setns mount umount2 pivot_root chroot
    169, 170, 171, 175, 313, 176, 246, 320,  # reboot sethostname setdomainname (f)init/delete_module kexec
    321, 298, 250, 248, 249, 167, 168,  # bpf perf_event_open keyctl add_key request_key swapon swapoff
    164, 227, 159, 305, 163, 172, 173, 141,  # settimeofday clock_settime adjtimex clock_adjtime acct iopl ioperm setpriority
    303, 304, 323, 425, 426, 427,  # name_to/open_by_handle_at userfaultfd io_uring_*
)  # fmt: skip


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _seccomp_filter(pid: int) -> bytes:
    """The BPF program (x86_64). Also: clone only for threads, clone3 -> ENOSYS (glibc falls back
    to clone), kill/tkill/tgkill only at this process, socket and socketpair -> EACCES (every
    family: a unix socket reaches host services through a socket file, e.g. Docker's), prlimit64
    only to read."""
    import errno

    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)

    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    arg_lo = lambda i: 16 + 8 * i  # noqa: E731 - offsets into struct seccomp_data
    # each block: "if nr == X" then instructions that all end in a return; jt/jf count instructions
    prog = [op(ld, 4), op(jeq, 0xC000003E, 1, 0), op(ret, eperm)]  # another arch (int 0x80): refuse
    prog += [op(ld, 0), op(jge, 0x40000000, 0, 1), op(ret, eperm)]  # the x32 ABI: refuse
    for nr in _DENY_X86_64:
        prog += [op(jeq, nr, 0, 1), op(ret, eperm)]
    prog += [op(jeq, 56, 0, 4), op(ld, arg_lo(0)), op(jset, _CLONE_THREAD, 0, 1), op(ret, allow), op(ret, eperm)]  # fmt: skip
    prog += [op(jeq, 435, 0, 1), op(ret, 0x00050000 | errno.ENOSYS)]
    for nr in (62, 200, 234):  # kill tkill tgkill: the first argument is the target (t)gid
        prog += [op(jeq, nr, 0, 4), op(ld, arg_lo(0)), op(jeq, pid, 0, 1), op(ret, allow), op(ret, eperm)]
    for nr in (41, 53):  # socket socketpair
        prog += [op(jeq, nr, 0, 1), op(ret, 0x00050000 | errno.EACCES)]
    prog += [op(jeq, 302, 0, 6), op(ld, arg_lo(2)), op(jeq, 0, 0, 3), op(ld, arg_lo(2) + 4), op(jeq, 0, 0, 1),
             op(ret, allow), op(ret, eperm)]  # fmt: skip
    return b"".join(prog + [op(ret, allow)])


def _install_seccomp(ctypes, libc) -> str:
    if os.uname().machine != "x86_64":
        return f"none (no filter for {os.uname().machine})"
    program = _seccomp_filter(os.getpid())

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    prog = Prog(len(program) // 8, program)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        return f"none (prctl: {os.strerror(ctypes.get_errno())})"
    return "seccomp"


def _read_roots() -> list[str]:
    """What the code may read: Python's own install, site-packages, the system libraries."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots |= {p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
    roots |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache"}
    real = {os.path.realpath(r) for r in roots if os.path.exists(r)}
    # nested roots add nothing: keep the outermost
    return sorted(r for r in real if r != "/" and not any(r != o and r.startswith(o + os.sep) for o in real))


def _landlock(ctypes, libc, tmp: str, read_roots: list[str]) -> str:
    abi = libc.syscall(_SYSCALL_LANDLOCK_CREATE, None, 0, 1)
    if abi < 1:
        return f"none (Landlock unavailable: {os.strerror(ctypes.get_errno())})"
    fs_all = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1  # every file right this ABI knows
    read_dir, read_file = 0b1101, 0b0101  # EXECUTE | READ_FILE | READ_DIR; files take no READ_DIR
    attr = struct.pack("QQQ", fs_all, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)  # no TCP; scoped
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYSCALL_LANDLOCK_CREATE, attr[:size], size, 0)
    if ruleset < 0:
        return f"none (landlock_create_ruleset: {os.strerror(ctypes.get_errno())})"
    try:
        rules = [(tmp, fs_all)] + [(r, read_dir if os.path.isdir(r) else read_file) for r in read_roots]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", access, fd)
                if libc.syscall(_SYSCALL_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) != 0:
                    return f"none (landlock_add_rule {path}: {os.strerror(ctypes.get_errno())})"
            finally:
                os.close(fd)
        if libc.syscall(_SYSCALL_LANDLOCK_RESTRICT, ruleset, 0) != 0:
            return f"none (landlock_restrict_self: {os.strerror(ctypes.get_errno())})"
    finally:
        os.close(ruleset)
    return f"landlock (ABI {abi})"


def _isolate(limits: dict, tmp: str) -> dict[str, str]:
    """Lock this process down (see the module docstring); returns which layer holds what."""
    import resource

    ctypes, libc = _libc()
    report = {}
    mb = 1 << 20
    for which, value in [
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mb),
        (resource.RLIMIT_CPU, int(limits["lifetime_cpu_seconds"])),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 64),
    ]:
        resource.setrlimit(which, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError instead
    report.update(_namespaces(ctypes, libc, tmp, int(limits["max_disk_mb"])))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    report["processes"] = "RLIMIT_NPROC" if os.getuid() != 0 else "none (uid 0 ignores RLIMIT_NPROC)"
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    report["files"] = _landlock(ctypes, libc, tmp, _read_roots())
    # uid 0 stays uid 0 (the interpreter may live where nobody else can read) but without any
    # capability; a user namespace's capabilities go too
    header = struct.pack("Ii", 0x20080522, 0)
    ok = hasattr(libc, "capset") and libc.capset(header, bytes(24)) == 0
    report["capabilities"] = "dropped" if ok else f"kept ({os.strerror(ctypes.get_errno())})"
    report["syscalls"] = _install_seccomp(ctypes, libc)
    return report


def _namespaces(ctypes, libc, tmp: str, disk_mb: int) -> dict[str, str]:
    """A network namespace, and a mount namespace in which `tmp` (the cwd) is a private tmpfs of
    `disk_mb`. uid 0 unshares them directly; otherwise (or where that is refused) a user namespace
    that maps only this uid and gid provides the right to. Runs before Landlock and seccomp (which
    refuses unshare and mount)."""
    root = os.geteuid() == 0
    attempts = [_CLONE_NEWNET | _CLONE_NEWNS] if root else []
    attempts += [_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS, _CLONE_NEWUSER | _CLONE_NEWNET]
    attempts += [_CLONE_NEWNET] if root else []
    errors = []
    for flags in attempts:
        if libc.unshare(flags) == 0:
            break
        errors.append(os.strerror(ctypes.get_errno()))
    else:
        reason = f"none (unshare: {errors[-1]})"
        return {"network": reason, "disk": reason}
    return {"network": "network namespace", "disk": _private_tmpfs(ctypes, libc, flags, tmp, disk_mb, errors)}


def _private_tmpfs(ctypes, libc, flags: int, tmp: str, disk_mb: int, errors: list[str]) -> str:
    if flags & _CLONE_NEWUSER:  # map this uid/gid to themselves, or tmpfs refuses to create files
        uid, gid = os.geteuid(), os.getegid()
        maps = [("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")]
        try:
            for name, text in maps:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as exc:
            return f"none (user namespace {name}: {exc.strerror})"
    if not flags & _CLONE_NEWNS:
        return f"none (mount namespace: {errors[-1]})"
    # private first: a mount under a shared "/" would propagate to the host's namespace
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return f"none (private mounts: {os.strerror(ctypes.get_errno())})"
    size = max(int(disk_mb), 1)  # size=0 would mean no limit
    options = f"size={size}m,nr_inodes=16384,mode=0700".encode()
    if libc.mount(b"tmpfs", os.fsencode(tmp), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options) != 0:
        return f"none (mount tmpfs: {os.strerror(ctypes.get_errno())})"
    os.chdir(tmp)  # the old cwd is the host's directory, now under the mount
    return f"tmpfs {size} MB"


_PATH_WRITE_EVENTS = frozenset({"os.mkdir", "os.rmdir", "os.remove", "os.truncate", "os.chmod", "os.chown", "os.utime", "os.rename"})  # fmt: skip
_PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn"})  # fmt: skip


def _audit_hook(tmp: str, read_roots: list[str]):
    """Python-level guard: refuses networking, processes, ctypes, rlimit changes, links and file
    access outside `tmp` (reads also under `read_roots`), raising PermissionError("blocked: ...")."""
    tmp = os.path.realpath(tmp)
    readable = tuple(read_roots)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    my_pid = os.getpid()

    def inside(path: Any, roots: tuple[str, ...]) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    def check_path(path: Any, write: bool) -> None:
        if not inside(path, (tmp,) if write else (tmp, *readable)):
            raise PermissionError(
                f"blocked: file access outside the working directory ({os.fsdecode(path)!r})"
            )

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (*args, None, None)[:3]
            write = (isinstance(flags, int) and bool(flags & write_flags)) or any(
                c in str(mode or "") for c in "wax+"
            )
            check_path(path, write)
        elif event in ("os.listdir", "os.scandir", "os.chdir") and args:
            check_path(args[0] if args[0] is not None else ".", False)
        elif event in _PATH_WRITE_EVENTS:
            for path in args[: 2 if event == "os.rename" else 1]:
                check_path(path, True)
        elif event in ("os.symlink", "os.link"):
            raise PermissionError("blocked: links are disabled")
        elif event.startswith("socket."):
            raise PermissionError("blocked: network access is disabled")
        elif event in _PROCESS_EVENTS:
            raise PermissionError("blocked: starting processes is disabled")
        elif event in ("os.killpg", "signal.pthread_kill") or (event == "os.kill" and args[0] != my_pid):
            raise PermissionError("blocked: signalling other processes is disabled")
        elif event.startswith("ctypes."):
            raise PermissionError("blocked: ctypes is disabled")
        elif event in ("resource.setrlimit", "resource.prlimit"):
            raise PermissionError("blocked: resource limits are fixed")

    return hook


# -- the request loops: python cells, function calls -----------------------------------------------


class _OutputLimit(BaseException):  # BaseException: `except Exception` in user code cannot swallow it
    pass


class _Capped:
    """sys.stdout/stderr for a cell: keeps at most `cap` characters, then stops the cell."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, cap: int):
        self.cap, self.parts, self.size = cap, [], 0

    def write(self, text: str) -> int:
        text = str(text)
        room = max(self.cap - self.size, 0)
        self.parts.append(text[:room])
        self.size += min(len(text), room)
        if len(text) > room:
            raise _OutputLimit(
                f"OutputLimitExceeded: output exceeded {self.cap} characters; the cell was stopped"
            )
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def value(self) -> str:
        return "".join(self.parts)


def _raise_timeout(message: str):
    def handler(signum, frame):
        raise TimeoutError(message)

    return handler


def _run_cell(code: str, namespace: dict, number: int, limits: dict, silent: bool) -> dict:
    import ast
    import linecache
    import traceback

    filename = f"<cell {number}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # tracebacks show lines
    out = _Capped(0 if silent else int(limits["max_output"]))
    error, recycle = None, False
    signal.signal(signal.SIGALRM, _raise_timeout(f"execution exceeded {limits['timeout']:g} s"))
    signal.signal(signal.SIGPROF, _raise_timeout(f"CPU time exceeded {limits['cpu_seconds']:g} s"))
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, float(limits["timeout"]))
            signal.setitimer(signal.ITIMER_PROF, float(limits["cpu_seconds"]))
            tree = ast.parse(code, filename)
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:  # echo a final bare expression, as a notebook does
                value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
                if value is not None:
                    print(repr(value))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.setitimer(signal.ITIMER_PROF, 0)
    except _OutputLimit as exc:
        error = str(exc)
    except MemoryError:
        error, recycle = f"MemoryError: out of memory (limit {limits['memory_mb']} MB)", True
    except BaseException as exc:  # noqa: BLE001 - the model's code may raise anything, SystemExit included
        recycle = _from_memory_error(exc)
        try:  # the traceback without this file's frames (the worker loop, the guards)
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
            lines = traceback.format_exception_only(type(exc), exc)
            if frames:
                lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames), *lines]
            error = lines[-1].strip()
            room = int(limits["max_output"]) - out.size
            if not silent and room > 0:
                out.parts.append("".join(lines)[-room:])
        except MemoryError:
            error, recycle = f"MemoryError: out of memory (limit {limits['memory_mb']} MB)", True
    finally:
        sys.stdout, sys.stderr = saved
    reply = {"output": "" if silent else out.value(), "error": error}
    if recycle:  # memory the cell took may stay taken (a half-filled list...): the host recycles us
        reply["recycle"] = True
    return reply


def _from_memory_error(exc: BaseException) -> bool:
    """Whether `exc` is, or was raised while handling, a MemoryError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _take_stdio() -> tuple[int, int]:
    """The protocol keeps private copies of stdin/stdout; fds 0-2 then point at /dev/null so that
    stray low-level writes cannot corrupt the protocol."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return proto_in, proto_out


def _python_worker(config: dict, proto_in: int, proto_out: int) -> None:
    limits, tmp = config["limits"], config["tmp"]
    read_roots = _read_roots()
    isolation = _isolate(limits, tmp)
    if limits["python_guard"]:
        sys.addaudithook(_audit_hook(tmp, read_roots))
        isolation["python"] = "audit hook"
    _write_frame(proto_out, {"isolation": isolation})
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    number = 0
    while True:
        try:
            request = _read_frame(proto_in)
        except EOFError:
            return
        number += 1
        reply = _run_cell(request["code"], namespace, number, limits, bool(request.get("silent")))
        _write_frame(proto_out, reply)


def _call_worker(config: dict, proto_in: int, proto_out: int) -> None:
    import importlib
    import resource
    import traceback

    if config.get("memory_mb"):
        size = config["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    sys.path[:0] = [p for p in config["sys_path"] if p not in sys.path]
    for name in config["preload"]:
        importlib.import_module(name)
    module_name, _, attr = config["function"].partition(":")
    function = getattr(importlib.import_module(module_name), attr)
    _write_frame(proto_out, {"ready": True})
    while True:
        try:
            request = _read_frame(proto_in)
        except EOFError:
            return
        try:
            reply = {"value": function(*request["args"])}
        except BaseException as exc:  # noqa: BLE001 - reported to the caller as text
            reply = {"error": traceback.format_exception_only(type(exc), exc)[-1].strip()}
        _write_frame(proto_out, reply)


def _worker_main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    proto_in, proto_out = _take_stdio()
    try:
        run = _python_worker if config["mode"] == "python" else _call_worker
        run(config, proto_in, proto_out)
    except BaseException as exc:  # noqa: BLE001 - setup failed: tell the host why, then exit
        try:
            _write_frame(proto_out, {"setup_error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        raise SystemExit(1) from None


if __name__ == "__main__":
    _worker_main(sys.argv)
