"""A warm process for the quick commands: torch and qkv imported once, then a fresh fork for each command.

Importing torch takes 1.3-1.4 s on a quiet 2-core machine, most of a ~2 s ``qkv explain``, and nothing in
qkv can make it shorter (BENCHMARKS.md, "The main job's floor"). ``qkv daemon start`` pays it once: a
background process (server.py) imports torch and the modules the quick commands use, then waits on a Unix
socket. A quick command (cli.main.QUICK_EXIT) that finds it (client.py) sends its arguments, working
directory, environment, process context (umask, interpreter flags, CPU affinity, niceness, resource limits,
ignored signals) and its own stdin/stdout/stderr (the file descriptors themselves, SCM_RIGHTS).

For each command the daemon forks a supervisor, which forks the command's process: that one takes all of the
above on, and the supervisor tells the client its pid. Only when the client answers "go" does the command
run, so a client that gives up before that (a timeout, a reset) can run the command itself: it never runs
twice. The supervisor waits for the command's process and sends back its exit code, or the signal it died
of, which the client then dies of too; when the client goes away (killed), the supervisor kills the command.
The client passes on Ctrl-C, SIGTERM, SIGHUP, Ctrl-Z and SIGCONT. The daemon never runs a tensor operation
(forking after OpenMP has started its threads can hang the child), and refuses to serve if its imports
started a thread (numpy's OpenBLAS pool aside: OpenBLAS stops it before a fork).

The client imports only the standard library, and runs the command in its own process whenever the daemon
is absent or declines: its code or its installed packages changed since it started (it then stops); an
environment variable read at import time (threads, ISA limits, PYTHON*, QKV_*, locale) or an interpreter
flag differs; the client's resource limits exceed the daemon's or it may not run at the daemon's priority;
it runs in other namespaces, groups or under another seccomp filter than the daemon (a sandbox); or it is
in the background of a terminal it reads. Only the user who started the daemon can talk to it: the socket
lives in a directory of mode 0700 that the user owns (``$XDG_RUNTIME_DIR/qkv``, else ``/tmp/qkv-UID``),
which the client checks too, and each side checks the other's uid (SO_PEERCRED).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys

# environment variables that take effect when torch or qkv is imported (or that qkv reads): a command whose
# values differ from the daemon's runs in its own process instead
IMPORT_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "ATEN_", "ONEDNN_", "DNNL_", "TORCH", "PYTORCH",
              "CUDA", "LD_", "PYTHON", "TOKENIZERS_", "QKV_", "LC_", "LANG")
LIMITS = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
          "RLIMIT_CORE")
FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # passed on to the command's process
MAX_MESSAGE = 1 << 20
DEFAULT_IDLE_MIN = 30.0


def supported() -> bool:
    """Linux: Unix sockets that pass descriptors and tell the peer's uid, pidfds, CPU affinity."""
    return (sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED") and hasattr(os, "pidfd_open")
            and hasattr(os, "sched_getaffinity"))


def state_dir() -> str:
    """Where the socket and log live: ``$XDG_RUNTIME_DIR/qkv``, else ``/tmp/qkv-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "qkv") if base else os.path.join("/tmp", f"qkv-{os.getuid()}")


def package_dir() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def socket_path() -> str:
    """One daemon per Python environment and qkv checkout: the name holds a hash of both."""
    from .. import __version__

    key = hashlib.sha256(f"{sys.prefix}\0{package_dir()}\0{__version__}".encode()).hexdigest()[:12]
    return os.path.join(state_dir(), f"daemon-{key}.sock")


def log_path(path: str | None = None) -> str:
    return (path or socket_path())[:-len(".sock")] + ".log"


def private_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a directory only this user can use (None when it is). Not followed if a link."""
    try:
        st = os.lstat(path)
    except OSError as e:  # missing, or a path we may not even look into (another user's runtime directory)
        return f"{path}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return f"{path} is not a directory only you can use (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
    return None


def context() -> dict:
    """What a fresh process would inherit or set up, besides its environment and descriptors."""
    umask = os.umask(0)
    os.umask(umask)
    return {"umask": umask, "flags": list(sys.flags), "warnoptions": list(sys.warnoptions),
            "xoptions": {str(k): str(v) for k, v in sys._xoptions.items()},
            "cpus": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "limits": {name: list(resource.getrlimit(getattr(resource, name))) for name in LIMITS},
            "ignored": [int(s) for s in FORWARD if signal.getsignal(s) == signal.SIG_IGN]}


# ------------------------------------------------------------------------------------------------ the wire


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    """A 4-byte length, then JSON; descriptors ride with the length."""
    body = json.dumps(message).encode()
    head = struct.pack(">I", len(body))
    if fds:
        socket.send_fds(sock, [head], fds)
        sock.sendall(body)
    else:
        sock.sendall(head + body)


def _exact(sock: socket.socket, n: int, data: bytes = b"") -> bytes:
    """``n`` bytes, never more: the next message stays in the socket for the next read."""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            if data:
                raise ValueError("message cut short")
            return b""
        data += more
    return data


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None at the end of the stream) and the descriptors that came with it — closed here if the
    message is not whole: a copy of a client's stdout kept open would keep its reader waiting forever."""
    fds: list[int] = []
    try:
        if max_fds:
            head, fds, _flags, _addr = socket.recv_fds(sock, 4, max_fds)
            head = _exact(sock, 4, head) if head else b""
        else:
            head = _exact(sock, 4)
        if not head:
            return None, fds
        size = struct.unpack(">I", head)[0]
        if size > MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes")
        body = _exact(sock, size)
        if len(body) != size:
            raise ValueError("message cut short")
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """The other end's pid, uid and gid, as the kernel tells them."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def connect(path: str, timeout: float) -> socket.socket | None:
    """A connection to this user's own daemon, or None: no socket, a directory others could have put one in,
    nobody listening (a daemon that was killed), or a listener of another user."""
    if private_dir_problem(os.path.dirname(path)) or not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        if peer(sock)[1] == os.getuid():
            return sock
    except OSError:
        pass
    sock.close()
    return None


def request(message: dict, path: str | None = None, timeout: float = 10.0) -> dict | None:
    """One question to the daemon (status, stop); None when no daemon answers."""
    sock = connect(path or socket_path(), timeout)
    if sock is None:
        return None
    with sock:
        try:
            send(sock, message)
            return receive(sock)[0]
        except (OSError, ValueError):
            return None


def run_in_daemon(argv: list[str]) -> int | None:
    """Run ``qkv ARGV`` in the daemon and return its exit code; None when it must run here (client.py)."""
    from .client import run

    return run(argv)
