"""``qkv daemon start|stop|status``: a warm process for the quick commands (qkv/daemon/)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status"],
                   help="start: import torch and qkv once in a background process, which then runs each quick "
                        "command (explain, generate, tokenize, ...) in a fresh fork of itself, skipping their "
                        "imports; stop; status")
    p.add_argument("--idle", type=float, default=None, metavar="MINUTES",
                   help="start: stop after this many minutes without a command (default 30)")
    p.epilog = ("A command finds the daemon by itself and runs in it when its environment matches; otherwise, or "
                "when none runs, it runs in its own process, with the same result.")


def run(args: argparse.Namespace) -> int:
    from .. import daemon

    if args.idle is not None and args.action != "start":
        raise InputError("--idle goes with `qkv daemon start` only")
    if args.action == "status":
        return _status(daemon)
    if args.action == "stop":
        return _stop(daemon)
    idle = daemon.DEFAULT_IDLE_MIN if args.idle is None else args.idle
    if not 0 < idle < float("inf"):  # NaN fails both
        raise InputError(f"--idle must be a positive number of minutes, got {args.idle}")
    return _start(daemon, idle * 60.0)


def _status(daemon) -> int:
    s = daemon.request({"op": "status"})
    if not s:
        last = _last_line(daemon.log_path())
        print("qkv daemon: not running" + (f" (its log's last line: {last})" if last else ""))
        return 1
    up = time.time() - s["started"]
    print(f"qkv daemon: running, pid {s['pid']}, up {up / 60:.1f} min, {s['requests']} commands served, "
          f"stops after {s['idle_s'] / 60:g} min idle; imports took {s['import_s']:.2f} s; socket {s['socket']}")
    if s.get("last_declined"):
        print(f"  the last command it declined (and left to run on its own): {s['last_declined']}")
    return 0


def _last_line(log: str) -> str | None:
    try:
        with open(log) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1] if lines else None


def _stop(daemon) -> int:
    path = daemon.socket_path()
    s = daemon.request({"op": "stop"}, path)
    if not s:
        print("qkv daemon: not running")
        return 0
    for _ in range(200):  # its socket goes as it leaves
        if not os.path.exists(path):
            break
        time.sleep(0.025)
    print(f"qkv daemon: stopped (pid {s['stopping']})")
    return 0


def _private_dir(daemon, path: str) -> None:
    """The socket's directory: made 0700, and refused if it is a link, someone else's, or open to others."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot make {path} for the daemon's socket: {e.strerror}; fix: set XDG_RUNTIME_DIR to "
                         "a directory only you can use") from None
    problem = daemon.private_dir_problem(path)
    if problem:
        raise InputError(f"{problem}, so the daemon's socket cannot live there; fix: set XDG_RUNTIME_DIR to a "
                         f"directory only you can use (or remove {path} if it is yours)")


def _start(daemon, idle_s: float) -> int:
    if not daemon.supported():
        raise InputError("qkv daemon needs Linux (Unix sockets that pass descriptors and name the peer's user); "
                         "fix: run the commands without it")
    path = daemon.socket_path()
    s = daemon.request({"op": "status"}, path)
    if s:
        print(f"qkv daemon: already running (pid {s['pid']}); `qkv daemon stop` first to restart it")
        return 0
    _private_dir(daemon, os.path.dirname(path))
    if os.path.exists(path):
        os.unlink(path)  # left by a daemon that was killed: nobody answered on it
    log = daemon.log_path(path)
    with open(log, "w") as out:
        # from /, so that `-m` puts no user directory first on its path: it imports the installed qkv
        proc = subprocess.Popen([sys.executable, "-m", "qkv.daemon", path, repr(idle_s)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                cwd="/")
    t = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t < 300:
        s = daemon.request({"op": "status"}, path)
        if s:
            print(f"qkv daemon: ready in {time.perf_counter() - t:.1f} s (pid {s['pid']}); quick commands now skip "
                  f"their imports; it stops after {idle_s / 60:g} min idle or with `qkv daemon stop`")
            return 0
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
    why = (_last_line(log) or "it wrote nothing").removeprefix("qkv daemon: ")
    if "fix:" not in why:  # a traceback's last line: the log has the rest
        why += f" (the log: {log}); fix: run the commands without the daemon"
    raise InputError(f"the daemon did not start: {why}")
