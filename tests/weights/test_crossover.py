"""This machine's crossover between a compact model's kernels and its dequantised weights for prompts
(qkv.weights.crossover, measured by ``qkv compile``): the rule that picks it, the measurement sending each
length down both paths, the cache a later load applies, and a missing, damaged or mismatched file meaning
the defaults, never an error. ``qkv compile`` reporting it: tests/models/test_compiled.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qkv
from qkv.nn.quant import COMPACT_ROWS, COMPACT_ROWS_BF16, COMPACT_ROWS_Q4, CompactLinear
from qkv.weights import crossover

from tests.models.conftest import tiny_gguf


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("crossover") / "q4.gguf", "Q4_0", seed=4)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of the test's own: a crossover saved here reaches no other test's loads."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_COMPILE", "auto")  # the suite's default is 0 (tests/conftest.py), which ignores it
    return tmp_path


def _rows(model) -> set[int]:
    return {m.small_m for m in crossover.layer_matrices(model)}


def _timed(*ratios: tuple[int, float]) -> dict[int, tuple[float, float]]:
    return {n: (r, 1.0) for n, r in ratios}


def test_choose_interpolates_where_the_compact_side_stops_winning():
    assert crossover.choose(_timed((8, 0.4), (16, 0.6), (32, 0.8), (48, 1.2))) == 40
    assert crossover.choose(_timed((8, 0.5), (16, 0.9), (24, 1.0), (32, 1.1))) == 24  # a tie is not a loss
    assert crossover.choose(_timed((8, 0.5), (16, 1.5), (24, 0.9), (32, 2.0))) == 12  # the first loss counts
    assert crossover.choose(_timed((8, 0.5), (64, 0.9))) == 64  # never slower: no further than measured
    assert crossover.choose(_timed((8, 1.3), (16, 1.5))) == 8  # slower at once: no shorter than measured
    assert crossover.choose(_timed((1, 0.2), (2, 1.01))) == 1


def test_measure_sends_every_length_down_both_paths_and_puts_the_rows_back(q4, cache, monkeypatch):
    model = qkv.load(q4).model
    before = _rows(model)
    assert before <= {COMPACT_ROWS, COMPACT_ROWS_BF16, COMPACT_ROWS_Q4}
    seen: set[tuple[int, bool]] = set()
    exact = CompactLinear._exact

    def spy(self, x):
        used = exact(self, x)
        seen.add((x.numel() // self.in_features, used))
        return used
    monkeypatch.setattr(CompactLinear, "_exact", spy)
    timed = crossover.measure(model, lengths=(2, 5, 9, 100000), turns=2)
    assert list(timed) == [2, 5, 9, model.config.max_position_embeddings]  # cut to the model's context
    assert all(a > 0 and b > 0 for a, b in timed.values())
    for n in timed:
        assert (n, True) in seen and (n, False) in seen, n
    assert _rows(model) == before
    assert 2 <= crossover.choose(timed) <= model.config.max_position_embeddings
    for bad in ({"turns": 0}, {"lengths": ()}, {"lengths": (0, 8)}):
        with pytest.raises(ValueError, match="measure needs"):
            crossover.measure(model, **bad)


def test_a_saved_crossover_is_what_later_loads_use(q4, cache, monkeypatch):
    model = qkv.load(q4).model
    default = _rows(model)
    assert "the default" in qkv.load(q4).info["compact_rows"]
    path = crossover.save(model, 7, _timed((4, 0.5), (8, 1.5)))
    assert path.parent == cache / "crossover" and json.loads(path.read_text())["rows"] == 7
    loaded = qkv.load(q4)
    assert _rows(loaded.model) == {7} and loaded.model.lm_head.small_m != 7  # the unembedding keeps its own
    assert loaded.info["compact_rows"] == "prompts of up to 7 tokens on the compact matrices (measured here by " \
                                          "qkv compile)"
    assert crossover.cached(loaded.model) == 7
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # another thread count is another machine's crossover
    try:
        assert _rows(qkv.load(q4).model) == default
    finally:
        torch.set_num_threads(threads)
    assert _rows(qkv.load(q4).model) == {7}
    monkeypatch.setenv("QKV_COMPILE", "0")  # uses nothing qkv compile made
    assert _rows(qkv.load(q4).model) == default


@pytest.mark.parametrize("damage", ["truncated", "not json", "rows 0", "rows huge", "rows true", "rows text",
                                    "other signature", "a folder"])
def test_a_damaged_or_foreign_file_means_the_defaults(q4, cache, damage):
    model = qkv.load(q4).model
    default = _rows(model)
    path = crossover.save(model, 7, _timed((4, 0.5), (8, 1.5)))
    d = json.loads(path.read_text())
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "not json":
        path.write_bytes(b"\xff\x00rows")
    elif damage == "a folder":
        path.unlink()
        path.mkdir()
    else:
        if damage == "other signature":
            d["signature"]["matrices"][0][1] += 1
        else:
            d["rows"] = {"rows 0": 0, "rows huge": crossover.MAX_ROWS + 1, "rows true": True, "rows text": "7"}[damage]
        path.write_text(json.dumps(d))
    loaded = qkv.load(q4)
    assert _rows(loaded.model) == default and "the default" in loaded.info["compact_rows"]


@pytest.mark.parametrize("where", ["the file", "the folder"])
def test_a_cache_it_cannot_write_still_serves_this_process(q4, cache, monkeypatch, where):
    """qkv compile's measurement applies to the model it measured even where it cannot be cached: one line in
    its report, no traceback."""
    from qkv.cli.compile import _crossover
    from qkv.errors import InputError

    def refuse_file(path, data):  # what qkv.io.write_bytes raises where the folder is read-only
        raise InputError(f"cannot write {path}: Read-only file system")

    def refuse_folder(*a, **k):
        raise PermissionError(30, "Read-only file system")
    model = qkv.load(q4).model
    if where == "the file":
        monkeypatch.setattr("qkv.io.write_bytes", refuse_file)
    else:
        monkeypatch.setattr("pathlib.Path.mkdir", refuse_folder)
    c = _crossover(model, force=False)
    assert c["measured"] and c["path"] is None and "Read-only file system" in c["error"]
    assert c["error"].startswith("cannot write") and "\n" not in c["error"]
    assert _rows(model) == {c["rows"]}
    assert not (cache / "crossover").exists() or not list((cache / "crossover").iterdir())
