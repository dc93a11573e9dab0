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
from qkv.cli.daemon import _private_dir
from qkv.errors import InputError

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
    assert (tmp_path / "b" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "b" / "fig.png").stat().st_size == (tmp_path / "a" / "fig.png").stat().st_size
    # standard input is the command's too
    piped = _qkv("tokenize", "-", "--format", "json", env=warm, input=SENTENCE)
    assert piped.returncode == 0 and piped.stdout == _qkv("tokenize", SENTENCE, "--format", "json", env=alone).stdout
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


def _start_generating(env: dict) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "qkv", "generate", "Once upon a time", "-n", "4000",
                          "--temperature", "0.8", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env)
    assert p.stdout.read(1), "nothing generated"  # it runs, in the daemon's fork
    return p


def test_ctrl_c_reaches_the_command_and_a_crashed_worker_is_reported(warm):
    p = _start_generating(warm)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "qkv: interrupted" in err.decode(), err
    daemon_pid = daemon.request({"op": "status"}, _socket(warm))["pid"]
    p = _start_generating(warm)
    (worker,) = _children(daemon_pid)
    os.kill(worker, signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert p.returncode == 1 and lines[-1].startswith("qkv: error: the daemon's worker ended"), err


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


def test_changed_code_is_declined_and_stops_the_daemon(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    stamp = daemon.source_stamp(str(tmp_path))
    os.utime(tmp_path / "a.py", ns=(1, 1))
    assert daemon.source_stamp(str(tmp_path)) != stamp
    d = daemon.Daemon(str(tmp_path / "d.sock"), 60.0)
    d.stamp = [0, 0, 0]  # as if qkv's files had changed since it started
    server, client = socket.socketpair()
    with server, client:
        assert d.run(server, None, {"env": dict(os.environ)}, []) is False  # False: the daemon stops
        assert "code changed" in daemon._receive(client)[0]["declined"]
    d.stamp = daemon.source_stamp()
    server, client = socket.socketpair()
    with server, client:
        assert d.run(server, None, {"env": dict(os.environ, OMP_NUM_THREADS="7")}, []) is True
        assert "environment" in daemon._receive(client)[0]["declined"]


def test_bad_input(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(InputError, match="only you can use"):
        _private_dir(str(shared))
    env = _env(tmp_path)
    for argv, says in ((("status", "--idle", "5"), "--idle goes with"), (("start", "--idle", "0"), "positive"),
                       (("start", "--idle", "nan"), "positive"), (("restart",), "invalid choice")):
        r = _qkv("daemon", *argv, env=env)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not os.path.exists(_socket(env))
