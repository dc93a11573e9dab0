"""`qkv daemon`: a quick command run in the warm process is the command run alone — the same bytes on stdout,
the same files, exit codes and one-line errors — and whenever the daemon cannot serve it faithfully (another
environment, changed code, killed, gone idle) the command runs in its own process instead."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkv import daemon

SENTENCE = "He sat on the river's bank"


def _qkv(*argv: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkv", *argv], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def _served(env: dict) -> int:
    r = _qkv("daemon", "status", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(r.stdout.split(" commands served")[0].rsplit(" ", 1)[1])


def _env(run_dir: Path) -> dict:
    return dict(os.environ, XDG_RUNTIME_DIR=str(run_dir))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A daemon of this module's own, and an environment that finds it."""
    env = _env(tmp_path_factory.mktemp("run"))
    r = _qkv("daemon", "start", env=env)
    assert r.returncode == 0 and "ready" in r.stdout, r.stdout + r.stderr
    yield env
    _qkv("daemon", "stop", env=env)


def test_a_command_in_the_daemon_is_the_command_run_alone(warm, tmp_path):
    alone = _env(tmp_path / "none")  # no daemon there: the command runs in its own process
    argv = ("explain", SENTENCE, "--token", "bank", "--measure", "norms,weights,mixing", "--format", "json")
    before = _served(warm)
    mine, theirs = _qkv(*argv, env=alone), _qkv(*argv, env=warm)
    assert mine.returncode == theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == mine.stdout and json.loads(theirs.stdout)["measures"]  # every byte, every number
    text = _qkv("explain", SENTENCE, "--token", "bank", env=warm)
    assert text.returncode == 0 and "river's" in text.stdout and "▶ bank" in text.stdout
    # a figure lands in the command's own directory, as the command alone writes it
    for d, env in (("a", alone), ("b", warm)):
        (tmp_path / d).mkdir()
        r = _qkv("explain", SENTENCE, "--token", "bank", "--png", "fig.png", env=env, cwd=tmp_path / d)
        assert r.returncode == 0 and "▶ bank" in r.stdout, r.stderr
    assert (tmp_path / "b" / "fig.png").read_bytes() == (tmp_path / "a" / "fig.png").read_bytes()
    # standard input is the command's too, byte for byte (a fresh process translates no line ends)
    text = "He sat on the river's bank\r\nand\rwatched"
    piped = _qkv("tokenize", "-", "--format", "json", env=warm, input=text)
    assert piped.returncode == 0 and piped.stdout == _qkv("tokenize", "-", "--format", "json", env=alone,
                                                          input=text).stdout
    assert json.loads(piped.stdout)["text"] == text
    assert _served(warm) == before + 4  # each of those four ran in the daemon


def test_errors_and_usage_keep_their_codes_and_one_line(warm):
    before = _served(warm)
    bad = _qkv("explain", "   ", env=warm)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("qkv: error:") and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    usage = _qkv("explain", SENTENCE, "--layer", "x", env=warm)
    assert usage.returncode == 2 and "invalid int value" in usage.stderr
    helped = _qkv("tokenize", "--help", env=warm)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: qkv tokenize")
    assert helped.stdout.count("usage:") == 1  # run once: the client never takes a quick exit code for a refusal
    assert _served(warm) == before + 3


def test_another_environment_runs_the_command_in_its_own_process(warm):
    before = _served(warm)
    r = _qkv("tokenize", SENTENCE, "--format", "json", env=dict(warm, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and json.loads(r.stdout)
    assert _served(warm) == before  # declined: torch reads OMP_NUM_THREADS as it is imported


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _start_chat(env: dict, daemon_pid: int) -> subprocess.Popen:
    """`qkv chat` in the daemon's fork, waiting for a message that never comes (its stdin stays open)."""
    p = subprocess.Popen([sys.executable, "-m", "qkv", "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 60
    while not _children(daemon_pid) and time.time() < deadline:
        time.sleep(0.05)
    assert _children(daemon_pid), "the chat did not start in the daemon"
    return p


def _no_children(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while _children(pid) and time.time() < deadline:
        time.sleep(0.1)
    return not _children(pid)


def test_signals_reach_the_command_and_its_end_is_the_clients(warm):
    daemon_pid = daemon.request({"op": "status"}, _socket(warm))["pid"]
    p = _start_chat(warm, daemon_pid)
    p.send_signal(signal.SIGINT)  # Ctrl-C: the command's own handling, exit 130
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "qkv: interrupted" in err.decode(), err
    assert _no_children(daemon_pid)
    p = _start_chat(warm, daemon_pid)
    p.send_signal(signal.SIGTERM)  # the command dies of it, and so does its client, as one process would
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM and _no_children(daemon_pid)
    p = _start_chat(warm, daemon_pid)
    p.kill()  # a client killed outright takes its command with it
    p.wait(timeout=60)
    assert _no_children(daemon_pid)
    p.stdin.close()
    p = _start_chat(warm, daemon_pid)
    (worker,) = _children(daemon_pid)
    os.kill(worker, signal.SIGKILL)  # the command's process killed on its own: said in one line
    _, err = p.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 1 and lines[-1].startswith("qkv: error: the command's process in the daemon ended"), err


def _socket(env: dict) -> str:
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = env["XDG_RUNTIME_DIR"]
    try:
        return daemon.socket_path()
    finally:
        os.environ["XDG_RUNTIME_DIR"] = saved


def test_a_killed_or_idle_daemon_leaves_the_commands_working(tmp_path):
    env = _env(tmp_path)
    assert _qkv("daemon", "start", "--idle", "0.05", env=env).returncode == 0  # three seconds idle
    pid = daemon.request({"op": "status"}, _socket(env))["pid"]
    os.kill(pid, signal.SIGKILL)
    assert os.path.exists(_socket(env))  # left behind: nobody listens on it
    r = _qkv("tokenize", SENTENCE, env=env)
    assert r.returncode == 0 and "river" in r.stdout
    assert _qkv("daemon", "status", env=env).returncode == 1
    assert _qkv("daemon", "start", "--idle", "0.05", env=env).returncode == 0  # starts over the stale socket
    deadline = time.time() + 60
    while os.path.exists(_socket(env)) and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(_socket(env))  # it stopped by itself and took its socket with it
    stopped = _qkv("daemon", "stop", env=env)
    assert stopped.returncode == 0 and "not running" in stopped.stdout


def test_a_daemon_declines_what_it_cannot_run_as_a_fresh_process(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    stamp = daemon.source_stamp(str(tmp_path))
    os.utime(tmp_path / "a.py", ns=(1, 1))
    assert daemon.source_stamp(str(tmp_path)) != stamp
    d = daemon.Daemon(str(tmp_path / "d.sock"), 60.0)
    fresh = {"env": dict(os.environ), **daemon.context()}
    assert d.decline(fresh) is None
    cases = {"environment": {"env": dict(os.environ, OMP_NUM_THREADS="7")},
             "flags": {"flags": [1 - f if i == 0 else f for i, f in enumerate(fresh["flags"])]},
             "priority": {"nice": fresh["nice"] - 1},
             "limit": {"limits": dict(fresh["limits"], RLIMIT_NOFILE=[10, d.context["limits"]["RLIMIT_NOFILE"][1] + 1])}}
    for says, change in cases.items():
        if says == "limit" and d.context["limits"]["RLIMIT_NOFILE"][1] == -1:
            continue  # no hard limit to exceed
        server, client = socket.socketpair()
        with server, client:
            assert d.run(server, None, dict(fresh, **change), []) is True  # declined; the daemon serves on
            assert says in daemon._receive(client)[0]["declined"]
    d.stamp = [0, 0, 0, []]  # as if qkv's files or the installed packages had changed since it started
    server, client = socket.socketpair()
    with server, client:
        assert d.run(server, None, fresh, []) is False  # False: the daemon stops
        assert "changed" in daemon._receive(client)[0]["declined"]


def test_the_wire_keeps_messages_apart():
    server, client = socket.socketpair()
    with server, client:
        daemon._send(server, {"pid": 1})
        daemon._send(server, {"exit": 3})  # both in the socket before the first read
        assert daemon._receive(client)[0] == {"pid": 1} and daemon._receive(client)[0] == {"exit": 3}
        r, w = os.pipe()
        daemon._send(client, {"op": "run", "env": {"X": "y" * 100_000}}, [r, w])  # a large environment
        message, fds = daemon._receive(server, max_fds=3)
        assert message["env"]["X"] == "y" * 100_000 and len(fds) == 2
        for fd in (r, w, *fds):
            os.close(fd)
        server.sendall(b"\x7f\xff\xff\xff")
        with pytest.raises(ValueError, match="bytes"):
            daemon._receive(client)


def test_a_socket_others_could_have_placed_is_never_used(tmp_path):
    env = _env(tmp_path)
    run_dir = tmp_path / "qkv"
    run_dir.mkdir()
    os.chmod(run_dir, 0o755)  # writable by its owner only, but open to others: not a place to trust
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with planted:
        planted.bind(_socket(env))
        planted.listen(4)
        r = _qkv("tokenize", SENTENCE, "--format", "json", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["text"] == SENTENCE  # ran in its own process
        planted.setblocking(False)
        with pytest.raises(BlockingIOError):
            planted.accept()  # nobody connected to it
        started = _qkv("daemon", "start", env=env)
        assert started.returncode == 2 and "only you can use" in started.stderr, started.stderr
        assert len(started.stderr.strip().splitlines()) == 1 and "fix: set XDG_RUNTIME_DIR" in started.stderr
    os.unlink(_socket(env))
    run_dir.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    run_dir.symlink_to(tmp_path / "elsewhere")  # a link, even to a private directory, is refused
    assert daemon.private_dir_problem(str(run_dir)) == f"{run_dir} is not a directory"


def test_bad_input(tmp_path):
    env = _env(tmp_path)
    for argv, says in ((("status", "--idle", "5"), "--idle goes with"), (("start", "--idle", "0"), "positive"),
                       (("start", "--idle", "nan"), "positive"), (("restart",), "invalid choice")):
        r = _qkv("daemon", *argv, env=env)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not os.path.exists(_socket(env))
