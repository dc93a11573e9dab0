"""200 cases of the fuzz campaign (``make fuzz`` runs 10,000 per reader): every reader of
untrusted input either loads the mutated input or refuses it with a typed one-line error — no other
exception, no hang, no memory blow-up, no crash. Each case runs in a child forked from this process."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import engine, readers
from fuzz.gguf_doc import read_doc, serialize

SEED = 16  # not the campaign's seed (0): the default suite covers other cases than `make fuzz`
CASES = {"gguf": 40, "safetensors": 30, "config": 30, "tokenizer": 30, "template": 40, "text": 30}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    readers.prepare(root)
    return root


def test_the_gguf_writer_reproduces_gguf_py(prepared: Path) -> None:
    """Mutations start from files gguf-py wrote: the document model loses nothing."""
    for path in (prepared / "seeds" / "bpe.gguf", prepared / "seeds" / "spm.gguf"):
        assert serialize(read_doc(path)) == path.read_bytes()


@pytest.mark.parametrize("reader", list(CASES))
def test_reader_holds_under_fuzzing(prepared: Path, reader: str) -> None:
    report = engine.run_cases(readers.runner(reader), reader, SEED, list(range(CASES[reader])),
                              workdir=prepared / "work")
    counts = report.counts()
    print(reader, counts, f"slow {report.slow()}, {report.wall_s:.1f} s")
    assert not report.failures(), "\n".join(f"case {o.index}: {o.kind}: {o.detail} <- {o.label}"
                                             for o in report.failures()[:10])
    assert counts["typed"] > 0 and counts["loaded"] > 0, counts  # both paths exercised


def test_the_engine_sees_each_kind_of_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself: an untyped error, a hang, a memory blow-up and a crash are each reported. Only the
    hang runs under a 1 s limit (to be quick): the others keep the campaign's, since touching 600 MB in a
    child forked from this large process can take over a second on a slow machine (then it read as a hang)."""
    import os
    import signal
    import time

    def untyped() -> None:
        raise KeyError("x")

    def hang() -> None:
        time.sleep(60)

    def blow_up() -> None:
        b = bytearray(600 * 2**20)
        b[::4096] = b"x" * len(b[::4096])  # touch every page

    def crash() -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    def kind(f) -> str:
        with monkeypatch.context() as m:
            if f is hang:
                m.setattr(engine, "HANG_S", 1.0)
            return engine.run_one(f, workdir=tmp_path).kind

    assert [kind(f) for f in (untyped, hang, blow_up, crash)] == ["untyped", "hang", "memory", "crash"]
