"""The daemon's side: import once, then for each command a supervisor and the command's own process."""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import time

from . import IMPORT_ENV, context, package_dir, peer, receive, send, socket_path

# what the daemon imports before it serves: what the quick commands' run() import lazily
PRELOAD = ("torch", "qkv.load", "qkv.explain.capture", "qkv.explain.measures", "qkv.explain.render_text",
           "qkv.explain.render_png", "qkv.generate", "qkv.embed")
NAMESPACES = ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup")


class DaemonError(RuntimeError):
    """Why the daemon cannot serve, as one line with its fix."""


def source_stamp(package: str | None = None) -> list:
    """What changes when qkv's code or the installed packages do: the count, newest mtime and total size of
    qkv's .py files, and the names (with versions) of what is installed in each site-packages directory."""
    count = newest = size = 0
    for root, _dirs, files in os.walk(package or package_dir()):
        for name in files:
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                count, newest, size = count + 1, max(newest, st.st_mtime_ns), size + st.st_size
    if package:
        return [count, newest, size]
    sites = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    installed = sorted(name for site in sites for name in os.listdir(site)
                       if name.endswith((".dist-info", ".egg-info", ".pth")))
    return [count, newest, size, installed]


def identity(pid: int) -> dict:
    """What makes a process a sandbox or not: its namespaces, groups, seccomp mode and no-new-privileges."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    out = {name: os.readlink(f"/proc/{pid}/ns/{name}") for name in NAMESPACES
           if os.path.exists(f"/proc/self/ns/{name}")}
    out.update({key: status.get(key, "").split() for key in ("Gid", "Groups", "Seccomp", "Seccomp_filters",
                                                             "NoNewPrivs")})
    return out


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV)}


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


class Daemon:
    """The server: imports, then one supervised fork per command until idle for ``idle_s`` or asked to stop."""

    def __init__(self, path: str, idle_s: float):
        self.path, self.idle_s = path, idle_s
        self.started, self.requests, self.import_s, self.inode = time.time(), 0, None, None
        self.env, self.stamp, self.context = _import_env(os.environ), source_stamp(), context()
        self.identity, self.last_declined = identity(os.getpid()), None

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
        from ..cli.main import QUICK_EXIT

        for command in sorted(QUICK_EXIT):
            importlib.import_module(f"qkv.cli.{command.replace('-', '_')}")
        gc.collect()
        gc.freeze()  # the children share these pages: no collection of them copies a page
        if _threads() != threads:  # e.g. OpenMP's pool: a child forked from it can hang
            raise DaemonError(f"its imports started {_threads() - threads} thread(s), after which forking is not "
                              "safe; fix: run the commands without the daemon (and report this)")
        self.import_s = time.perf_counter() - t
        self.stamp = source_stamp()  # after the imports, which may write bytecode

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
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the supervisors are reaped by the kernel
        listener.settimeout(self.idle_s)
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                print("qkv daemon: stopping after its idle time", flush=True)
                return
            with conn:
                try:
                    if not self.answer(conn, listener):
                        return
                except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:  # malformed: on to the next
                    print(f"qkv daemon: a request failed: {e!r}", flush=True)

    def answer(self, conn: socket.socket, listener: socket.socket) -> bool:
        """Serve one connection; False when the daemon should stop."""
        conn.settimeout(5.0)
        message, fds = receive(conn, max_fds=3)
        try:
            if peer(conn)[1] != os.getuid() or not message:
                return True
            op = message.get("op")
            if op == "status":
                send(conn, self.status())
            elif op == "stop":
                send(conn, {"stopping": os.getpid()})
                print("qkv daemon: stopping, as asked", flush=True)
                return False
            elif op == "run" and len(fds) == 3:
                return self.run(conn, listener, message, fds)
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def status(self) -> dict:
        return {"pid": os.getpid(), "started": self.started, "requests": self.requests, "idle_s": self.idle_s,
                "import_s": self.import_s, "socket": self.path, "last_declined": self.last_declined}

    def decline(self, message: dict, conn: socket.socket) -> str | None:
        """Why this daemon cannot run the command as a fresh process would (None: it can)."""
        env = _import_env(message["env"])
        differ = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
        if differ:
            return f"{', '.join(differ)} (read at import time) differ from the daemon's"
        mine = self.context
        if any(message[k] != mine[k] for k in ("flags", "warnoptions", "xoptions")):
            return "the interpreter's flags or options differ from the daemon's"
        if message["nice"] < mine["nice"]:
            return "the command may not run at a higher priority than the daemon's"
        for name, (_soft, hard) in message["limits"].items():
            top = mine["limits"][name][1]
            if top != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > top):
                return f"the command's {name} exceeds the daemon's"
        try:
            theirs = identity(peer(conn)[0])
        except (OSError, ValueError):
            theirs = None
        if theirs != self.identity:
            return "the command runs in other namespaces, groups or under another seccomp filter (a sandbox?)"
        return None

    def run(self, conn, listener, message: dict, fds: list[int]) -> bool:
        if source_stamp() != self.stamp:
            self.declined(conn, "qkv's code or an installed package changed since the daemon started; it stops")
            return False
        why = self.decline(message, conn)
        if why:
            self.declined(conn, why)
            return True
        self.requests += 1
        if os.fork() == 0:
            try:  # whatever happens in the child, it never returns into the server's loop
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                listener.close()
                _supervise(conn, message, fds)
            finally:
                os._exit(1)
        return True

    def declined(self, conn: socket.socket, why: str) -> None:
        """Said to the client (which then runs the command itself), to the log, and to `qkv daemon status`."""
        self.last_declined = why
        print(f"qkv daemon: declined a command: {why}", flush=True)
        send(conn, {"declined": why})

    def close(self, listener: socket.socket) -> None:
        listener.close()
        try:
            if os.stat(self.path).st_ino == self.inode:  # still ours, not a newer daemon's
                os.unlink(self.path)
        except OSError:
            pass


def _supervise(conn: socket.socket, message: dict, fds: list[int]) -> None:
    """The supervisor: fork the command's process, tell the client its pid, let it run on the client's "go",
    wait for it, and send its end (exit code or signal); kill it if the client goes away first."""
    conn.settimeout(None)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (ready_r, go_w, conn.fileno()):
                os.close(fd)
            _command(message, fds, ready_w, go_r)
        finally:
            os._exit(1)
    for fd in (*fds, ready_w, go_r):
        os.close(fd)
    command = os.pidfd_open(pid)
    problem = os.read(ready_r, 4096)
    if problem != b"\0":
        send(conn, {"declined": problem.decode(errors="replace") or "the command's process ended at once"})
        os.waitpid(pid, 0)
        return
    send(conn, {"pid": pid})
    go = receive(conn)[0]
    if go and go.get("go"):
        os.write(go_w, b"g")
    os.close(go_w)  # without "go" the command's process leaves before running anything
    import threading

    threading.Thread(target=_kill_when_client_leaves, args=(conn, command), daemon=True).start()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    send(conn, {"exit": code} if code >= 0 else {"signal": -code})


def _kill_when_client_leaves(conn: socket.socket, command: int) -> None:
    """The client sends nothing after "go": the end of its stream means it is gone, and so is the command
    (stopped or not). The pidfd never names another process, even once the command is reaped."""
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    try:
        signal.pidfd_send_signal(command, signal.SIGKILL)
    except OSError:
        pass


def _adopt(message: dict, fds: list[int]) -> None:
    """Become the command's process: its signals, descriptors, directory, environment, limits, streams."""
    import io
    import random

    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                         (signal.SIGHUP, signal.SIG_DFL)):
        signal.signal(sig, signal.SIG_IGN if int(sig) in message["ignored"] else default)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    time.tzset()  # local time as the command's TZ says
    os.umask(int(message["umask"]))
    os.sched_setaffinity(0, message["cpus"])  # OpenMP sizes its pool from it, on first use: in this process
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


def _command(message: dict, fds: list[int], ready_w: int, go_r: int) -> None:
    """The command's process: adopt, say so, wait for "go", run main() as a fresh process would, exit."""
    try:
        _adopt(message, fds)
    except (OSError, ValueError, TypeError, LookupError) as e:  # nothing ran: the client runs the command
        os.write(ready_w, f"the command's process could not be set up: {e}".encode()[:4000])
        os._exit(1)
    os.write(ready_w, b"\0")
    os.close(ready_w)
    if os.read(go_r, 1) != b"g":
        os._exit(1)
    os.close(go_r)
    code = 1
    try:
        code = _main(message["argv"])
    except SystemExit as e:  # argparse: --help, a usage error
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:  # Ctrl-C before main() could take it
        print("qkv: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # what a fresh process would print
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _main(argv: list[str]) -> int:
    from ..cli.common import pause_gc
    from ..cli.main import main

    pause_gc()
    return main(argv)


def serve_main(path: str, idle_s: float) -> int:
    """``python -m qkv.daemon PATH IDLE_S``: what ``qkv daemon start`` runs, detached. Its last line of output
    (the log) says why, when it cannot serve."""
    try:
        if socket_path() != path:
            raise DaemonError(f"the qkv in {package_dir()} would serve another socket than the command's ({path}); "
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
