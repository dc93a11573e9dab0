"""A warm process for the quick commands: torch and qkv imported once, then a fresh fork for each command.

Importing torch takes 1.3-1.4 s on a quiet 2-core machine, most of a ~2 s ``qkv explain``, and nothing in
qkv can make it shorter (BENCHMARKS.md, "The main job's floor"). ``qkv daemon start`` pays it once: a
background process imports torch and the modules the quick commands use, then waits on a Unix socket. A
quick command (cli.main.QUICK_EXIT) that finds it sends its arguments, working directory, environment,
umask and its own stdin/stdout/stderr (the file descriptors themselves, SCM_RIGHTS) and waits for an exit
code. The daemon forks; the child takes those descriptors, that directory and environment, and runs the same
``main(argv)`` a fresh process would, so output, terminal detection, files and exit codes are the command's
own. The parent never runs a tensor operation (forking after OpenMP has started its threads can hang the
child), and refuses to serve if its imports started a thread (numpy's OpenBLAS pool aside: OpenBLAS stops
it before a fork).

The client side (:func:`run_in_daemon`) imports only the standard library, and falls back to running the
command in its own process whenever the daemon is absent or declines: its code changed since it started
(it then stops), or an environment variable read at import time (threads, ISA limits, PYTHON*, QKV_*)
differs from the one it started with. Only the user who started it can connect: its socket lives in a
directory of mode 0700 (``$XDG_RUNTIME_DIR/qkv``, else ``/tmp/qkv-UID``) and each peer's uid is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time

# environment variables that take effect when torch or qkv is imported (or that qkv reads): a command whose
# values differ from the daemon's runs in its own process instead
IMPORT_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "ATEN_", "ONEDNN_", "DNNL_", "TORCH", "PYTORCH",
              "CUDA", "LD_", "PYTHON", "TOKENIZERS_", "QKV_", "LC_", "LANG")
# what the daemon imports before it serves: what the quick commands' run() import lazily
PRELOAD = ("torch", "qkv.load", "qkv.explain.capture", "qkv.explain.measures", "qkv.explain.render_text",
           "qkv.explain.render_png", "qkv.generate", "qkv.embed")
MAX_MESSAGE = 1 << 20
DEFAULT_IDLE_MIN = 30.0


def state_dir() -> str:
    """Where the socket and log live: ``$XDG_RUNTIME_DIR/qkv`` (per user, mode 0700 by the system), else
    ``/tmp/qkv-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "qkv") if base else os.path.join("/tmp", f"qkv-{os.getuid()}")


def socket_path() -> str:
    """One daemon per Python environment and qkv checkout: the name holds a hash of both."""
    package = os.path.dirname(os.path.abspath(__file__))
    from . import __version__

    key = hashlib.sha256(f"{sys.prefix}\0{package}\0{__version__}".encode()).hexdigest()[:12]
    return os.path.join(state_dir(), f"daemon-{key}.sock")


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    data = struct.pack(">I", len(data)) + data
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None at end of stream) and the descriptors that came with it."""
    if max_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, max_fds)
    else:
        data, fds = sock.recv(1 << 16), []
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > MAX_MESSAGE:
            raise ValueError("message too long")
        more = sock.recv(1 << 16)
        if not more:
            if data:
                raise ValueError("message cut short")
            return None, fds
        data += more
    return json.loads(data[4:4 + struct.unpack(">I", data[:4])[0]]), fds


def _connect(path: str, timeout: float | None = None) -> socket.socket | None:
    if not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:  # a socket left by a daemon that was killed: nobody listens
        sock.close()
        return None
    return sock


def request(message: dict, path: str | None = None, timeout: float = 10.0) -> dict | None:
    """One question to the daemon (status, stop); None when no daemon answers."""
    sock = _connect(path or socket_path(), timeout)
    if sock is None:
        return None
    with sock:
        try:
            _send(sock, message)
            return _receive(sock)[0]
        except (OSError, ValueError):
            return None


# ---------------------------------------------------------------------------------------------- the client


def _stdio_ok() -> bool:
    try:
        return all(os.fstat(fd) is not None for fd in (0, 1, 2))
    except OSError:  # a closed standard stream: nothing to hand over
        return False


def _streams() -> list:
    """How Python opened this process's standard streams (encoding, errors, line buffering, write-through:
    ``-u``/PYTHONUNBUFFERED), for the child to open its own the same way."""
    return [[getattr(s, "encoding", None) or "utf-8", getattr(s, "errors", None) or "strict",
             bool(getattr(s, "line_buffering", False)), bool(getattr(s, "write_through", False))]
            for s in (sys.stdin, sys.stdout, sys.stderr)]


def run_in_daemon(argv: list[str]) -> int | None:
    """Run ``qkv ARGV`` in the daemon and return its exit code; None when it must run here (no daemon, or
    it declined). Signals that would stop this process (Ctrl-C, SIGTERM, SIGHUP) are passed to the child."""
    if not _stdio_ok():
        return None
    sock = _connect(socket_path())
    if sock is None:
        return None
    umask = os.umask(0)
    os.umask(umask)
    message = {"op": "run", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
               "streams": _streams()}
    with sock:
        try:
            _send(sock, message, [0, 1, 2])
            reply = _receive(sock)[0]
        except (OSError, ValueError):
            return None
        except KeyboardInterrupt:
            print("qkv: interrupted", file=sys.stderr)
            return 130
        if not reply or "pid" not in reply:
            return None  # declined: the command runs here, the same way
        pid = int(reply["pid"])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: _forward(pid, s))
        try:
            done = _receive(sock)[0]
        except (OSError, ValueError):
            done = None
    if not done or "exit" not in done:
        print("qkv: error: the daemon's worker ended without an exit code (it crashed); fix: run "
              "`qkv daemon stop` and the command again", file=sys.stderr)
        return 1
    return int(done["exit"])


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------- the daemon


def source_stamp(package: str | None = None) -> list:
    """What changes when qkv's code does: the count, newest mtime and total size of its .py files."""
    count = newest = size = 0
    for root, _dirs, files in os.walk(package or os.path.dirname(os.path.abspath(__file__))):
        for name in files:
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                count, newest, size = count + 1, max(newest, st.st_mtime_ns), size + st.st_size
    return [count, newest, size]


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV)}


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


class Daemon:
    """The server: imports, then one fork per command until idle for ``idle_s`` or asked to stop."""

    def __init__(self, path: str, idle_s: float):
        self.path, self.idle_s = path, idle_s
        self.started, self.requests = time.time(), 0
        self.env = _import_env(os.environ)
        self.stamp = source_stamp()

    def preload(self) -> float:
        import gc
        import importlib

        t = time.perf_counter()
        try:  # numpy's OpenBLAS starts its threads as it loads; its fork handler stops them, so they are safe
            import numpy  # noqa: F401
        except ImportError:
            pass
        threads = _threads()
        for name in PRELOAD:
            importlib.import_module(name)
        from .cli.main import QUICK_EXIT

        for command in sorted(QUICK_EXIT):
            importlib.import_module(f"qkv.cli.{command.replace('-', '_')}")
        gc.collect()
        gc.freeze()  # the children share these pages: no collection of them copies a page
        if _threads() != threads:  # e.g. OpenMP's pool: a child forked from it can hang
            raise RuntimeError(f"{_threads() - threads} thread(s) started by the imports; forking now would not be "
                               "safe")
        return time.perf_counter() - t

    def listen(self) -> socket.socket:
        """Bind under a temporary name and rename into place: a client never meets a socket not yet ready."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(16)
        os.replace(tmp, self.path)
        self.inode = os.stat(self.path).st_ino
        return sock

    def serve(self, listener: socket.socket) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped by the kernel
        listener.settimeout(self.idle_s)
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                return  # idle long enough
            with conn:
                try:
                    if not self.answer(conn, listener):
                        return
                except (OSError, ValueError, KeyError, TypeError) as e:  # a malformed request: the next one
                    print(f"qkv daemon: a request failed: {e!r}", flush=True)

    def answer(self, conn: socket.socket, listener: socket.socket) -> bool:
        """Serve one connection; False when the daemon should stop."""
        conn.settimeout(5.0)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        try:
            message, fds = _receive(conn, max_fds=3)
        except (OSError, ValueError):
            return True
        try:
            if uid != os.getuid() or not message:
                return True
            op = message.get("op")
            if op == "status":
                _send(conn, self.status())
            elif op == "stop":
                _send(conn, {"stopping": os.getpid()})
                return False
            elif op == "run" and len(fds) == 3:
                return self.run(conn, listener, message, fds)
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def status(self) -> dict:
        return {"pid": os.getpid(), "started": self.started, "requests": self.requests, "idle_s": self.idle_s,
                "import_s": getattr(self, "import_s", None), "socket": self.path}

    def run(self, conn, listener, message: dict, fds: list[int]) -> bool:
        if source_stamp() != self.stamp:
            _send(conn, {"declined": "qkv's code changed since the daemon started; it stops"})
            return False
        if _import_env(message["env"]) != self.env:
            _send(conn, {"declined": "an environment variable read at import time differs"})
            return True
        self.requests += 1
        if os.fork() == 0:  # the child tells the client its pid, then its exit code: in that order
            listener.close()
            _child(conn, message, fds)  # never returns
        return True

    def close(self, listener: socket.socket) -> None:
        listener.close()
        try:
            if os.stat(self.path).st_ino == self.inode:  # still ours, not a newer daemon's
                os.unlink(self.path)
        except (OSError, AttributeError):
            pass


def _child(conn: socket.socket, message: dict, fds: list[int]) -> None:
    """In the fork: become the command's process (descriptors, directory, environment) and run main()."""
    import io

    code = 1
    try:
        _send(conn, {"pid": os.getpid()})
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses of the command are waited for
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(message["cwd"])
        os.environ.clear()
        os.environ.update(message["env"])
        os.umask(int(message["umask"]))
        streams = [io.TextIOWrapper(io.open(n, mode, closefd=False), encoding=enc, errors=err,
                                    line_buffering=line, write_through=through)
                   for n, mode, (enc, err, line, through) in zip(range(3), ("rb", "wb", "wb"), message["streams"])]
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
        sys.argv = ["qkv", *message["argv"]]
        import random

        random.seed()  # a fresh process's own seed, not a copy of the daemon's
        code = _main(message["argv"])
    except SystemExit as e:  # argparse: --help, a usage error
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what a fresh process would print
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            _send(conn, {"exit": code})
        except OSError:
            pass
        os._exit(code)


def _main(argv: list[str]) -> int:
    from .cli.common import pause_gc
    from .cli.main import main

    pause_gc()
    return main(argv)


def serve_main(path: str, idle_s: float) -> int:
    """``python -m qkv.daemon PATH IDLE_S``: what ``qkv daemon start`` runs, detached."""
    if socket_path() != path:  # another qkv than the client's would serve it
        raise RuntimeError(f"this qkv ({os.path.dirname(os.path.abspath(__file__))}) serves {socket_path()}, "
                           f"not {path}")
    os.chdir("/")  # a daemon holds no user directory busy; each command runs in its own
    daemon = Daemon(path, idle_s)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through close(): the socket goes too
    daemon.import_s = daemon.preload()
    listener = daemon.listen()
    print(f"qkv daemon {os.getpid()}: imports took {daemon.import_s:.2f} s; listening on {path}", flush=True)
    try:
        daemon.serve(listener)
    finally:
        daemon.close(listener)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1], float(sys.argv[2])))
