"""How the ``qkv`` process ends (qkv.cli.main.entry): the quick commands leave without the interpreter's
teardown, and lose nothing by it — stdout whole (to a file, to a pipe that closes early), exit codes kept,
files written; every other command, and any command with QKV_CLEAN_EXIT=1, shuts down as usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qkv.cli.main import QUICK_EXIT, SUBCOMMANDS, main

# an atexit handler announces the ordinary shutdown; the quick exit skips it
PROBE = ("import atexit, sys; atexit.register(lambda: print('TEARDOWN', file=sys.stderr)); "
         "sys.argv = ['qkv', *sys.argv[1:]]; from qkv.cli.main import entry; entry()")


def _qkv(*argv: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), **kw)


def test_a_quick_command_skips_the_teardown_and_keeps_its_output(capsys):
    assert QUICK_EXIT < set(SUBCOMMANDS) and not QUICK_EXIT & {"train", "compile", "serve", "export", "daemon"}
    argv = ["tokenize", "He sat on the river's bank", "--format", "json"]
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)
    r = _qkv(*argv)
    assert r.returncode == 0 and "TEARDOWN" not in r.stderr, r.stderr
    assert json.loads(r.stdout) == want  # every byte of it reached the pipe
    clean = _qkv(*argv, env={"QKV_CLEAN_EXIT": "1"})
    assert clean.returncode == 0 and "TEARDOWN" in clean.stderr and clean.stdout == r.stdout


def test_errors_keep_their_code_and_one_line():
    r = _qkv("explain", "   ")
    assert r.returncode == 2 and "TEARDOWN" not in r.stderr
    assert r.stderr.startswith("qkv: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _qkv("tokenize", "Hi", env={"QKV_CLEAN_EXIT": "yes"})  # a value that is not 0 or 1 is refused
    assert r.returncode == 2 and "QKV_CLEAN_EXIT='yes'" in r.stderr and r.stdout == ""
    assert len(r.stderr.replace("TEARDOWN", "").strip().splitlines()) == 1, r.stderr


def test_other_commands_shut_down_as_usual():
    r = _qkv("export", "smollm2")  # no --hf or --gguf: a one-line error, exit 2
    assert r.returncode == 2 and "TEARDOWN" in r.stderr


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    text = "word " * 2000
    p = subprocess.Popen([sys.executable, "-c", PROBE, "tokenize", text, "--model", "smollm2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(64)  # then the reader goes away, like `| head -c 64`
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_files_a_quick_command_writes_are_whole(tmp_path):
    png, html = tmp_path / "bank.png", tmp_path / "bank.html"
    r = _qkv("explain", "He sat on the river's bank", "--token", "bank", "--png", str(png), "--html", str(html))
    assert r.returncode == 0 and "TEARDOWN" not in r.stderr, r.stderr
    assert png.read_bytes().startswith(b"\x89PNG") and png.read_bytes().endswith(b"IEND\xaeB`\x82")
    assert html.read_text(encoding="utf-8").rstrip().endswith("</html>")  # complete, not cut


def test_import_qkv_imports_no_torch_and_the_public_names_are_the_functions():
    """``import qkv`` is light (the command pauses the collector before torch's import: it must come first);
    the public names resolve on use, and importing the submodules that share two of them never replaces them."""
    code = ("import sys, qkv; assert 'torch' not in sys.modules, 'torch imported'; "
            "import qkv.generate.loop, qkv.embed, qkv.load; from qkv import files; "
            "import inspect; assert all(inspect.isfunction(getattr(qkv, n)) for n in "
            "('generate', 'embed', 'load', 'capture', 'attention')), [qkv.generate, qkv.embed, qkv.load]; "
            "assert qkv.nn.attention is qkv.attention and files.__name__ == 'qkv.files'; "
            "assert set(qkv.__all__) <= set(dir(qkv)); "
            "assert not hasattr(qkv, 'x.y') and not hasattr(qkv, '_nope') and not hasattr(qkv, '__wrapped__'); "
            "print(type(qkv.QkvError).__name__, qkv.AttentionRecord.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["type", "AttentionRecord"], r.stderr
    r = subprocess.run([sys.executable, "-c", "import qkv; qkv.nope"], capture_output=True, text=True)
    assert "module 'qkv' has no attribute 'nope'" in r.stderr


GC_PROBE = ("import gc, sys; sys.argv = ['qkv', *sys.argv[1:]]; import qkv.cli.common as c; seen = []; "
            "done = c.startup_done; c.startup_done = lambda: (seen.append((gc.isenabled(), 'torch' in sys.modules)), "
            "done(), print('AFTER', seen, gc.isenabled(), gc.get_freeze_count() > 100000, file=sys.stderr)); "
            "from qkv.cli.main import entry; entry()")


def test_the_collector_is_paused_for_start_up_then_frozen_out_and_resumed():
    """A quick command's start-up (torch's import, the model's load) runs with the collector paused; once the
    model is loaded what exists is frozen and the collector runs again. Called in-process, main() leaves the
    collector alone (a library's caller decides that)."""
    import gc

    r = subprocess.run([sys.executable, "-c", GC_PROBE, "explain", "He sat on the river's bank", "--token", "bank"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "AFTER [(False, True)] True True" in r.stderr, r.stderr
    assert "river's" in r.stdout
    before = gc.isenabled()
    assert main(["tokenize", "Hi", "--format", "json"]) == 0 and gc.isenabled() == before
