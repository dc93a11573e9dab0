"""The quick command's side: hand the command to the daemon, relay signals, end as the command ended."""

from __future__ import annotations

import os
import signal
import socket
import sys

from . import FORWARD, connect, context, receive, send, socket_path, supported

CONNECT_S, ANSWER_S = 5.0, 10.0


def _streams() -> list:
    """How Python opened this process's standard streams (encoding, errors, line buffering, write-through,
    unbuffered: ``-u``), for the command's process to open its own the same way."""
    import io

    return [[getattr(s, "encoding", None) or "utf-8", getattr(s, "errors", None) or "strict",
             bool(getattr(s, "line_buffering", False)), bool(getattr(s, "write_through", False)),
             isinstance(getattr(s, "buffer", None), io.FileIO)]
            for s in (sys.stdin, sys.stdout, sys.stderr)]


def _in_background() -> bool:
    """A terminal on a standard stream whose foreground is not us (``qkv chat &``): job control, which stops a
    background reader of the terminal, applies to this process only, so the command runs here."""
    try:
        return any(os.isatty(fd) and os.tcgetpgrp(fd) != os.getpgrp() for fd in (0, 1, 2))
    except OSError:  # a terminal that is not ours to ask
        return True


def run(argv: list[str]) -> int | None:
    """Run ``qkv ARGV`` in the daemon and return its exit code; None when it must run here (no daemon, or it
    declined, or it did not answer: in each case before anything ran)."""
    if not supported():
        return None
    try:
        for fd in (0, 1, 2):
            os.fstat(fd)
        cwd = os.getcwd()
    except OSError:  # a closed standard stream, a deleted directory: this process deals with it
        return None
    if _in_background():
        return None
    sock = connect(socket_path(), CONNECT_S)
    if sock is None:
        return None
    message = {"op": "run", "argv": argv, "cwd": cwd, "env": dict(os.environ), "streams": _streams(),
               **context()}
    try:
        with sock:
            return _exchange(sock, message)
    except KeyboardInterrupt:  # before "go": nothing ran
        print("qkv: interrupted", file=sys.stderr)
        return 130


def _exchange(sock: socket.socket, message: dict) -> int | None:
    # the signals to pass on wait until there is a pid to pass them to
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARD)
    try:
        try:
            send(sock, message, [0, 1, 2])
            sock.settimeout(ANSWER_S)
            reply = receive(sock)[0]
        except (OSError, ValueError):  # refused, reset, silent: the command has not run without our "go"
            return None
        if not reply or "pid" not in reply:
            return None  # declined: the command runs here, the same way
        try:
            send(sock, {"go": True})
        except OSError:  # gone: without our "go" the command did not run
            return None
        relay = _Relay(int(reply["pid"]), message["ignored"])  # only now: a command run here keeps Python's own
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that came meanwhile is passed on now
    sock.settimeout(None)
    try:
        done = receive(sock)[0]
    except (OSError, ValueError):
        done = None
    if done and "exit" in done:
        return int(done["exit"])
    if done and "signal" in done:
        return relay.die_of(int(done["signal"]))
    print("qkv: error: the daemon's process for this command ended without its exit code (the daemon was "
          "killed?); fix: run the command again, or `qkv daemon stop` to run commands on their own",
          file=sys.stderr)
    return 1


class _Relay:
    """The client's signals, passed on to the command's process through a pidfd (a reused pid is never
    signalled)."""

    def __init__(self, pid: int, ignored: list[int]):
        try:
            self.fd = os.pidfd_open(pid)
        except OSError:  # gone already
            self.fd = None
        for sig in FORWARD:
            if sig not in ignored:  # `nohup qkv …` stays deaf to hangups
                signal.signal(sig, lambda s, _f: self._kill(s))
        signal.signal(signal.SIGTSTP, self._stop)
        signal.signal(signal.SIGCONT, self._cont)

    def _kill(self, sig: int) -> None:
        if self.fd is not None:
            try:
                signal.pidfd_send_signal(self.fd, sig)
            except OSError:
                pass

    def _stop(self, _sig: int, _frame) -> None:  # Ctrl-Z: the command stops with its client
        self._kill(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def _cont(self, _sig: int, _frame) -> None:
        if _in_background() and os.isatty(0):
            # `bg` after Ctrl-Z: a command that may read the terminal waits stopped, as the shell shows, for
            # `fg` — as job control stops a background reader of the terminal
            os.kill(os.getpid(), signal.SIGTTIN)
            return
        self._kill(signal.SIGCONT)

    @staticmethod
    def die_of(sig: int) -> int:
        """The command died of ``sig``: so does this process, as if it had been the command's."""
        sys.stdout.flush()
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        return 128 + sig  # a signal that does not end a process
