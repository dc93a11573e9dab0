"""`qkv daemon`: a quick command run in the warm process is the command run alone — the same bytes on stdout,
the same files, exit codes, one-line errors, signals and limits — and whenever the daemon cannot serve it
faithfully (another environment, a sandbox, changed code, a socket it cannot trust, killed, gone idle) the
command runs in its own process instead, once."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qkv import daemon
from qkv.daemon import server

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
    assert r.returncode == 0 and json.loads(r.stdout)["text"] == SENTENCE
    assert _served(warm) == before  # declined: torch reads OMP_NUM_THREADS as it is imported
    status = _qkv("daemon", "status", env=warm).stdout
    assert "OMP_NUM_THREADS (read at import time) differ" in status, status


def test_a_client_in_another_namespace_runs_the_command_in_its_own_process(warm):
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net is not permitted here (it needs root or user namespaces); "
                    "test_a_daemon_declines_what_it_cannot_run_as_a_fresh_process checks the identity comparison")
    before = _served(warm)
    r = subprocess.run(["unshare", "--net", sys.executable, "-m", "qkv", "tokenize", SENTENCE, "--format", "json"],
                       capture_output=True, text=True, env=warm, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["text"] == SENTENCE
    assert _served(warm) == before and "namespaces" in _qkv("daemon", "status", env=warm).stdout


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


def _commands(daemon_pid: int) -> list[int]:
    """The commands' processes: children of the daemon's supervisors."""
    return [c for s in _children(daemon_pid) for c in _children(s)]


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _start_chat(env: dict, daemon_pid: int, **kw) -> tuple[subprocess.Popen, int]:
    """`qkv chat` in the daemon, waiting for a message that never comes (its stdin stays open), and its pid."""
    p = subprocess.Popen([sys.executable, "-m", "qkv", "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, **kw)
    deadline = time.time() + 60
    while len(_commands(daemon_pid)) != 1 and time.time() < deadline:
        time.sleep(0.05)
    (command,) = _commands(daemon_pid)
    while not Path(f"/proc/{command}/syscall").read_text().startswith("0 0x0 ") and time.time() < deadline:
        time.sleep(0.05)  # until it waits on stdin: read(0, ...)
    return p, command


def _none_left(daemon_pid: int, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while _children(daemon_pid) and time.time() < deadline:
        time.sleep(0.1)
    return not _children(daemon_pid)


def test_signals_reach_the_command_and_its_end_is_the_clients(warm):
    daemon_pid = daemon.request({"op": "status"}, _socket(warm))["pid"]
    p, command = _start_chat(warm, daemon_pid)
    p.send_signal(signal.SIGTSTP)  # Ctrl-Z stops both; SIGCONT resumes both
    time.sleep(0.5)
    assert (_state(p.pid), _state(command)) == ("T", "T")
    p.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    assert _state(command) != "T"
    p.send_signal(signal.SIGINT)  # Ctrl-C: the command's own handling, exit 130
    p.wait(timeout=60)  # stdin still open: the end of it must not be what ends the chat
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.decode().count("qkv: interrupted") == 1, err
    assert _none_left(daemon_pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the command dies of a signal: so does its client
        p, command = _start_chat(warm, daemon_pid)
        os.kill(command, sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == -sig and not err, err
    assert _none_left(daemon_pid)
    p, command = _start_chat(warm, daemon_pid)
    p.send_signal(signal.SIGTSTP)
    time.sleep(0.5)
    p.kill()  # a client killed outright takes its command with it, even a stopped one
    p.wait(timeout=60)
    assert _none_left(daemon_pid)
    p.stdin.close()


def test_nohup_and_the_commands_affinity_priority_and_limits(warm):
    daemon_pid = daemon.request({"op": "status"}, _socket(warm))["pid"]

    def limited():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup` leaves it
        os.sched_setaffinity(0, {0})
        os.nice(1)
        resource.setrlimit(resource.RLIMIT_NOFILE, (321, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    p, command = _start_chat(warm, daemon_pid, preexec_fn=limited)
    status = Path(f"/proc/{command}/status").read_text()
    assert "Cpus_allowed_list:\t0\n" in status, status
    assert int(Path(f"/proc/{command}/stat").read_text().rsplit(")", 1)[1].split()[16]) == 1  # its nice value
    assert any(line.startswith("Max open files") and line.split()[3] == "321"
               for line in Path(f"/proc/{command}/limits").read_text().splitlines())
    p.send_signal(signal.SIGHUP)  # ignored by the client, so by its command too
    time.sleep(0.5)
    assert p.poll() is None and _commands(daemon_pid) == [command]
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    p.communicate(timeout=60)
    assert p.returncode == 130 and _none_left(daemon_pid)


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
    stopped = _qkv("daemon", "status", env=env)
    assert stopped.returncode == 1 and "idle time" in stopped.stdout, stopped.stdout


def test_a_daemon_declines_what_it_cannot_run_as_a_fresh_process(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    stamp = server.source_stamp(str(tmp_path))
    os.utime(tmp_path / "a.py", ns=(1, 1))
    assert server.source_stamp(str(tmp_path)) != stamp
    d = server.Daemon(str(tmp_path / "d.sock"), 60.0)
    fresh = {"env": dict(os.environ), **daemon.context()}
    nofile = d.context["limits"]["RLIMIT_NOFILE"][1]
    cases = {"OMP_NUM_THREADS": {"env": dict(os.environ, OMP_NUM_THREADS="7")},
             "flags": {"flags": [1 - f if i == 0 else f for i, f in enumerate(fresh["flags"])]},
             "priority": {"nice": fresh["nice"] - 1},
             "RLIMIT_NOFILE": {"limits": dict(fresh["limits"], RLIMIT_NOFILE=[10, nofile + 1])}}
    for says, change in cases.items():
        if says == "RLIMIT_NOFILE" and nofile == resource.RLIM_INFINITY:
            continue  # no hard limit to exceed
        server_end, client = socket.socketpair()
        with server_end, client:
            client.settimeout(5)
            assert d.decline(fresh, server_end) is None
            assert d.run(server_end, None, dict(fresh, **change), []) is True  # declined; the daemon serves on
            assert says in daemon.receive(client)[0]["declined"]
    d.identity = dict(d.identity, net="net:[1]")  # as if the command ran in another network namespace
    server_end, client = socket.socketpair()
    with server_end, client:
        assert "namespaces" in d.decline(fresh, server_end)
    d.stamp = [0, 0, 0, []]  # as if qkv's files or the installed packages had changed since it started
    server_end, client = socket.socketpair()
    with server_end, client:
        client.settimeout(5)
        assert d.run(server_end, None, fresh, []) is False  # False: the daemon stops
        assert "changed" in daemon.receive(client)[0]["declined"]


def test_the_wire_keeps_messages_apart():
    server_end, client = socket.socketpair()
    with server_end, client:
        daemon.send(server_end, {"pid": 1})
        daemon.send(server_end, {"exit": 3})  # both in the socket before the first read
        assert daemon.receive(client)[0] == {"pid": 1} and daemon.receive(client)[0] == {"exit": 3}
        r, w = os.pipe()
        daemon.send(client, {"op": "run", "env": {"X": "y" * 100_000}}, [r, w])  # a large environment
        message, fds = daemon.receive(server_end, max_fds=3)
        assert message["env"]["X"] == "y" * 100_000 and len(fds) == 2
        for fd in (r, w, *fds):
            os.close(fd)
        server_end.sendall(b"\x7f\xff\xff\xff")
        with pytest.raises(ValueError, match="bytes"):
            daemon.receive(client)


def test_a_socket_that_cannot_be_trusted_or_does_not_answer_is_left_alone(tmp_path):
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
        os.chmod(run_dir, 0o700)  # now a private directory, with a listener that hangs up on every command
        planted.setblocking(True)
        hang_up = threading.Thread(target=lambda: [planted.accept()[0].close() for _ in range(2)], daemon=True)
        hang_up.start()
        for _ in range(2):
            r = _qkv("tokenize", SENTENCE, "--format", "json", env=env)
            assert r.returncode == 0 and json.loads(r.stdout)["text"] == SENTENCE and not r.stderr  # run once, here
        hang_up.join(10)
    os.unlink(_socket(env))
    run_dir.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    run_dir.symlink_to(tmp_path / "elsewhere")  # a link, even to a private directory, is refused
    assert daemon.private_dir_problem(str(run_dir)) == f"{run_dir} is not a directory"
    run_dir.unlink()
    (tmp_path / "file").write_text("")
    r = _qkv("tokenize", SENTENCE, env=_env(tmp_path / "file"))  # a runtime directory that is a file
    assert r.returncode == 0 and "river" in r.stdout and not r.stderr


def test_bad_input(tmp_path):
    env = _env(tmp_path)
    for argv, says in ((("status", "--idle", "5"), "--idle goes with"), (("start", "--idle", "0"), "positive"),
                       (("start", "--idle", "nan"), "positive"), (("restart",), "invalid choice")):
        r = _qkv("daemon", *argv, env=env)
        assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not os.path.exists(_socket(env))
