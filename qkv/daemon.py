"""A warm process for the quick commands: torch and qkv imported once, then a fresh fork for each command.

Importing torch takes 1.3-1.4 s on a quiet 2-core machine, most of a ~2 s ``qkv explain``, and nothing in
qkv can make it shorter (BENCHMARKS.md, "The main job's floor"). ``qkv daemon start`` pays it once: a
background process imports torch and the modules the quick commands use, then waits on a Unix socket. A
quick command (cli.main.QUICK_EXIT) that finds it sends its arguments, working directory, environment, umask,
process context (interpreter flags, CPU affinity, niceness, resource limits, ignored signals) and its own
stdin/stdout/stderr (the file descriptors themselves, SCM_RIGHTS), then waits. The daemon forks; the child
takes all of that on, tells the client its pid, runs the same ``main(argv)`` a fresh process would, and
sends back its exit code. The client passes on the signals that would stop it (Ctrl-C, SIGTERM, SIGHUP,
Ctrl-Z and its SIGCONT) and dies of the same signal when its command did; the child dies with its client.
The parent never runs a tensor operation (forking after OpenMP has started its threads can hang the child),
and refuses to serve if its imports started a thread (numpy's OpenBLAS pool aside: OpenBLAS stops it
before a fork).

The client imports only the standard library, and runs the command in its own process whenever the daemon
is absent or declines: its code or its installed packages changed since it started (it then stops), an
environment variable read at import time (threads, ISA limits, PYTHON*, QKV_*, locale) or an interpreter
flag differs, or the client's resource limits exceed the daemon's. Only the user who started it can talk
to it: its socket lives in a directory of mode 0700 that the user owns (``$XDG_RUNTIME_DIR/qkv``, else
``/tmp/qkv-UID``), which the client checks too, and each side checks the other's uid (SO_PEERCRED).
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
import time

# environment variables that take effect when torch or qkv is imported (or that qkv reads): a command whose
# values differ from the daemon's runs in its own process instead
IMPORT_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "ATEN_", "ONEDNN_", "DNNL_", "TORCH", "PYTORCH",
              "CUDA", "LD_", "PYTHON", "TOKENIZERS_", "QKV_", "LC_", "LANG")
# what the daemon imports before it serves: what the quick commands' run() import lazily
PRELOAD = ("torch", "qkv.load", "qkv.explain.capture", "qkv.explain.measures", "qkv.explain.render_text",
           "qkv.explain.render_png", "qkv.generate", "qkv.embed")
LIMITS = ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC")
FORWARD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # passed on to the command's process
MAX_MESSAGE = 1 << 20
DEFAULT_IDLE_MIN = 30.0
CONNECT_S, ANSWER_S = 5.0, 30.0


class DaemonError(RuntimeError):
    """Why the daemon cannot serve, as one line with its fix."""


def supported() -> bool:
    """Linux: Unix sockets that pass descriptors and tell the peer's uid, pidfds, CPU affinity."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_PEERCRED") and hasattr(os, "sched_getaffinity")


def state_dir() -> str:
    """Where the socket and log live: ``$XDG_RUNTIME_DIR/qkv``, else ``/tmp/qkv-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "qkv") if base else os.path.join("/tmp", f"qkv-{os.getuid()}")


def socket_path() -> str:
    """One daemon per Python environment and qkv checkout: the name holds a hash of both."""
    from . import __version__

    key = hashlib.sha256(f"{sys.prefix}\0{_package()}\0{__version__}".encode()).hexdigest()[:12]
    return os.path.join(state_dir(), f"daemon-{key}.sock")


def _package() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def private_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a directory only this user can use (None when it is). Not followed if a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return f"{path} is not a directory only you can use (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
    return None


# ------------------------------------------------------------------------------------------------ the wire


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
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


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
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


def _peer_uid(sock: socket.socket) -> int:
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def _connect(path: str, timeout: float) -> socket.socket | None:
    """A connection to this user's own daemon, or None: no socket, a directory others could have put one in,
    nobody listening (a daemon that was killed), or a listener of another user."""
    if private_dir_problem(os.path.dirname(path)) or not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        if _peer_uid(sock) == os.getuid():
            return sock
    except OSError:
        pass
    sock.close()
    return None


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


def _streams() -> list:
    """How Python opened this process's standard streams (encoding, errors, line buffering, write-through,
    unbuffered: ``-u``), for the child to open its own the same way."""
    import io

    return [[getattr(s, "encoding", None) or "utf-8", getattr(s, "errors", None) or "strict",
             bool(getattr(s, "line_buffering", False)), bool(getattr(s, "write_through", False)),
             isinstance(getattr(s, "buffer", None), io.FileIO)]
            for s in (sys.stdin, sys.stdout, sys.stderr)]


def context() -> dict:
    """What a fresh process would inherit or set up besides its environment."""
    umask = os.umask(0)
    os.umask(umask)
    return {"umask": umask, "flags": list(sys.flags), "warnoptions": list(sys.warnoptions),
            "xoptions": {str(k): str(v) for k, v in sys._xoptions.items()},
            "cpus": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "limits": {name: list(resource.getrlimit(getattr(resource, name))) for name in LIMITS},
            "ignored": [int(s) for s in FORWARD if signal.getsignal(s) == signal.SIG_IGN]}


def run_in_daemon(argv: list[str]) -> int | None:
    """Run ``qkv ARGV`` in the daemon and return its exit code; None when it must run here (no daemon, or it
    declined before anything ran)."""
    if not supported():
        return None
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
        cwd = os.getcwd()
    except OSError:  # a closed standard stream, a deleted directory: this process deals with it
        return None
    sock = _connect(socket_path(), CONNECT_S)
    if sock is None:
        return None
    message = {"op": "run", "argv": argv, "cwd": cwd, "env": dict(os.environ), "streams": _streams(),
               **context()}
    try:
        with sock:
            return _exchange(sock, message)
    except KeyboardInterrupt:  # before the command started: nothing ran
        print("qkv: interrupted", file=sys.stderr)
        return 130


def _exchange(sock: socket.socket, message: dict) -> int | None:
    # the signals to pass on wait until there is a pid to pass them to
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARD)
    try:
        try:
            _send(sock, message, [0, 1, 2])
        except OSError:
            return None
        sock.settimeout(ANSWER_S)
        try:
            reply = _receive(sock)[0]
        except (OSError, ValueError):
            print(f"qkv: error: the daemon at {sock.getpeername()} did not answer in {ANSWER_S:g} s; fix: "
                  "`qkv daemon stop` (or kill it) and run the command again", file=sys.stderr)
            return 1
        if not reply or "pid" not in reply:
            return None  # declined: the command runs here, the same way
        relay = _Relay(int(reply["pid"]), message["ignored"])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that came meanwhile is passed on now
    sock.settimeout(None)
    try:
        done = _receive(sock)[0]
    except (OSError, ValueError):
        done = None
    return int(done["exit"]) if done and "exit" in done else relay.died()


class _Relay:
    """The client's signals, passed on to the command's process (through a pidfd where there is one, so a
    reused pid is never signalled)."""

    def __init__(self, pid: int, ignored: list[int]):
        self.pid, self.last = pid, None
        try:
            self.fd = os.pidfd_open(pid)
        except (OSError, AttributeError):  # gone already, or no pidfds here
            self.fd = None
        for sig in FORWARD:
            if sig not in ignored:  # `nohup qkv …` stays deaf to hangups
                signal.signal(sig, self._pass)
        signal.signal(signal.SIGTSTP, self._stop)
        signal.signal(signal.SIGCONT, lambda *_: self._kill(signal.SIGCONT))

    def _kill(self, sig: int) -> None:
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
        except OSError:
            pass

    def _pass(self, sig: int, _frame) -> None:
        self.last = sig
        self._kill(sig)

    def _stop(self, _sig: int, _frame) -> None:  # Ctrl-Z: the command stops with its client
        self._kill(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def died(self) -> int:
        """No exit code came: the command died of a signal we passed on (we die of it too, as a fresh process
        would), or of something else."""
        if self.last in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(self.last, signal.SIG_DFL)
            os.kill(os.getpid(), self.last)
            return 128 + self.last
        print("qkv: error: the command's process in the daemon ended without an exit code (killed, or it "
              "crashed); fix: run the command again, or `qkv daemon stop` to run commands on their own",
              file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------- the daemon


def source_stamp(package: str | None = None) -> list:
    """What changes when qkv's code or the installed packages do: the count, newest mtime and total size of
    qkv's .py files, and the mtime of every directory on the import path (installing or upgrading a package
    adds and removes entries there)."""
    count = newest = size = 0
    for root, _dirs, files in os.walk(package or _package()):
        for name in files:
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                count, newest, size = count + 1, max(newest, st.st_mtime_ns), size + st.st_size
    paths = [] if package else [os.stat(p).st_mtime_ns for p in sys.path if p and os.path.isdir(p)]
    return [count, newest, size, paths]


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
        self.started, self.requests, self.import_s, self.inode = time.time(), 0, None, None
        self.env, self.stamp, self.context = _import_env(os.environ), source_stamp(), context()

    def preload(self) -> None:
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
            raise DaemonError(f"its imports started {_threads() - threads} thread(s), after which forking is not "
                              "safe; fix: run the commands without the daemon (and report this)")
        self.import_s = time.perf_counter() - t

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
                except (OSError, ValueError, KeyError, TypeError) as e:  # a malformed request: on to the next
                    print(f"qkv daemon: a request failed: {e!r}", flush=True)

    def answer(self, conn: socket.socket, listener: socket.socket) -> bool:
        """Serve one connection; False when the daemon should stop."""
        conn.settimeout(5.0)
        message, fds = _receive(conn, max_fds=3)
        try:
            if _peer_uid(conn) != os.getuid() or not message:
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
                "import_s": self.import_s, "socket": self.path}

    def decline(self, message: dict) -> str | None:
        """Why this daemon cannot run the command as a fresh process would (None: it can)."""
        if _import_env(message["env"]) != self.env:
            return "an environment variable read at import time differs"
        mine = self.context
        if [message[k] for k in ("flags", "warnoptions", "xoptions")] != [mine[k] for k in ("flags", "warnoptions",
                                                                                            "xoptions")]:
            return "the interpreter's flags or options differ"
        if message["nice"] < mine["nice"]:
            return "the command's process may not run at a higher priority than the daemon's"
        for name, (_soft, hard) in message["limits"].items():
            top = mine["limits"][name][1]
            if top != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > top):
                return f"the command's {name} limit exceeds the daemon's"
        return None

    def run(self, conn, listener, message: dict, fds: list[int]) -> bool:
        if source_stamp() != self.stamp:
            _send(conn, {"declined": "qkv's code or an installed package changed since the daemon started; it "
                                     "stops"})
            return False
        why = self.decline(message)
        if why:
            _send(conn, {"declined": why})
            return True
        self.requests += 1
        if os.fork() == 0:
            try:  # whatever happens in the child, it never returns into the server's loop
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                listener.close()
                _child(conn, message, fds)
            finally:
                os._exit(1)
        return True

    def close(self, listener: socket.socket) -> None:
        listener.close()
        try:
            if os.stat(self.path).st_ino == self.inode:  # still ours, not a newer daemon's
                os.unlink(self.path)
        except OSError:
            pass


def _adopt(message: dict, fds: list[int]) -> None:
    """Become the command's process: its signals, descriptors, directory, environment, limits, streams."""
    import io
    import random

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # subprocesses of the command are waited for
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                         (signal.SIGHUP, signal.SIG_DFL)):
        signal.signal(sig, signal.SIG_IGN if int(sig) in message["ignored"] else default)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    os.umask(int(message["umask"]))
    os.sched_setaffinity(0, message["cpus"])  # OpenMP sizes its pool from it, on first use: in this child
    os.setpriority(os.PRIO_PROCESS, 0, int(message["nice"]))
    for name, (soft, hard) in message["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    streams = []
    for n, mode, (enc, err, line, through, raw) in zip(range(3), ("rb", "wb", "wb"), message["streams"]):
        binary = io.open(n, mode, buffering=0 if raw else -1, closefd=False)
        # newline="\n": no translation, as Python opens them on POSIX
        streams.append(io.TextIOWrapper(binary, encoding=enc, errors=err, newline="\n", line_buffering=line,
                                        write_through=through))
    sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
    sys.argv = ["qkv", *message["argv"]]
    random.seed()  # a fresh process's own seed, not a copy of the daemon's


def _child(conn: socket.socket, message: dict, fds: list[int]) -> None:
    """In the fork: adopt the command's process, tell the client our pid, run main(), send the exit code."""
    conn.settimeout(None)
    try:
        _adopt(message, fds)
    except (OSError, ValueError, KeyError, TypeError) as e:  # nothing ran: the client runs the command itself
        _send(conn, {"declined": f"the command's process could not be set up: {e}"})
        os._exit(1)
    _send(conn, {"pid": os.getpid()})
    import threading

    threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
    code = 1
    try:
        code = _main(message["argv"])
    except SystemExit as e:  # argparse: --help, a usage error
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what a fresh process would print
        import traceback

        traceback.print_exc()
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


def _die_with_client(conn: socket.socket) -> None:
    """The client sends nothing more: the end of its stream means it is gone (killed), and so is the command."""
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _main(argv: list[str]) -> int:
    from .cli.common import pause_gc
    from .cli.main import main

    pause_gc()
    return main(argv)


def serve_main(path: str, idle_s: float) -> int:
    """``python -m qkv.daemon PATH IDLE_S``: what ``qkv daemon start`` runs, detached. Its last line of output
    (the log) says why, when it cannot serve."""
    try:
        if socket_path() != path:
            raise DaemonError(f"the qkv in {_package()} would serve another socket than the command's ({path}); "
                              "fix: install the checkout you run into this environment (`pip install -e .`)")
        os.chdir("/")  # a daemon holds no user directory busy; each command runs in its own
        daemon = Daemon(path, idle_s)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through close(): the socket goes too
        daemon.preload()
    except DaemonError as e:
        print(f"qkv daemon: {e}", flush=True)
        return 1
    listener = daemon.listen()
    print(f"qkv daemon {os.getpid()}: imports took {daemon.import_s:.2f} s; listening on {path}", flush=True)
    try:
        daemon.serve(listener)
    finally:
        daemon.close(listener)
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1], float(sys.argv[2])))
