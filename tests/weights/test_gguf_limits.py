"""GGUF counts a file could hold but no model needs are refused from the header (issue #16): parsing a
hostile file stays within about a second and a few hundred MB of Python objects."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest

from qkv.errors import ModelFormatError
from qkv.weights.gguf import MAX_ARRAY_ITEMS, MAX_METADATA_ITEMS, MAX_TENSORS, read_gguf


def fails_fast(path: Any, *phrases: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelFormatError) as info:
        read_gguf(path)
    assert time.perf_counter() - start < 1.0
    msg = str(info.value)
    assert "\n" not in msg
    for phrase in phrases:
        assert phrase in msg, msg


def test_too_many_tensors_are_refused_from_the_header(gg: Any, write: Any) -> None:
    n = MAX_TENSORS + 1
    body = b"".join(gg.tinfo(f"t{i}", [1], 0, 0) for i in range(8))  # the count is checked before the table
    fails_fast(write(gg.assemble([], [body], n_tensors=n) + bytes(33 * n)), f"{n} tensors", str(MAX_TENSORS))


def test_one_array_longer_than_any_vocabulary_is_refused(gg: Any, write: Any) -> None:
    n = MAX_ARRAY_ITEMS + 1
    payload = struct.pack("<IQ", gg.UINT8, n) + bytes(n)
    fails_fast(write(gg.assemble([gg.kv("test.big", gg.ARRAY, payload)], [])), f"array length {n}", "one array")


def test_arrays_together_are_bounded(gg: Any, write: Any) -> None:
    n = MAX_ARRAY_ITEMS
    kvs = [gg.kv(f"test.a{i}", gg.ARRAY, struct.pack("<IQ", gg.UINT8, n) + bytes(n))
           for i in range(MAX_METADATA_ITEMS // n + 1)]
    fails_fast(write(gg.assemble(kvs, [])), "all arrays together")


def test_a_real_sized_vocabulary_still_reads(gg: Any, write: Any) -> None:
    tokens = b"".join(gg.gstr(f"t{i}") for i in range(300_000))  # more than any real vocabulary (262k)
    kv = gg.kv("tokenizer.ggml.tokens", gg.ARRAY, struct.pack("<IQ", gg.STRING, 300_000) + tokens)
    with read_gguf(write(gg.assemble([kv], []))) as f:
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 300_000
