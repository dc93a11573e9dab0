"""Malformed GGUF files (RELIABILITY.md §9.1 G1–G13, G18): each fails fast with ModelFormatError.

Every case checks the error is one line naming the file and a byte offset, that it takes well
under a second, and (for the huge-count shapes) that nothing big was allocated on the way.
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from qkv.errors import ModelFormatError
from qkv.weights.gguf import read_gguf

import gguf  # a dev dependency: a missing install must fail, not skip

U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1


def expect_error(path: Path, *phrases: str) -> str:
    """read_gguf(path) must raise ModelFormatError: one line, naming the file, fast and small."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFormatError) as info:
            read_gguf(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for phrase in phrases:
        assert phrase.lower() in msg.lower(), f"{phrase!r} not in: {msg}"
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    assert peak < 10 * 2**20, f"allocated {peak / 2**20:.1f} MiB"
    return msg


def one_tensor(gg: Any, ne: list[int], type_id: int = 0, offset: int = 0, *,
               name: str | bytes = "t", data: bytes | None = None,
               n_dims: int | None = None) -> bytes:
    """A file with one tensor; data defaults to zeros of a plausible size (F32-sized, capped)."""
    if data is None:
        n = 1
        for d in ne:
            n *= d
        data = bytes(min(4 * n, 4096))
    return gg.assemble([], [gg.tinfo(name, ne, type_id, offset, n_dims)], data)


def meta(gg: Any, *entries: bytes) -> bytes:
    """A file with only these metadata entries."""
    return gg.assemble(list(entries), [])


def array(gg: Any, key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    """A file with one array entry whose header says ``count`` items of ``item_type``."""
    return meta(gg, gg.kv(key, gg.ARRAY, struct.pack("<IQ", item_type, count) + items))


def two_tensors(gg: Any, a: tuple[str, int, int], b: tuple[str, int, int], size: int) -> bytes:
    """Two F32 tensors given as (name, n_elements, offset) over ``size`` data bytes."""
    infos = [gg.tinfo(name, [n], 0, off) for name, n, off in (a, b)]
    return gg.assemble([], infos, bytes(size))


def nested_arrays(gg: Any, depth: int) -> bytes:
    """``depth`` levels of array-of-array, each of length 1 (gguf-py recursion shape, G5)."""
    inner = struct.pack("<IQ", gg.UINT8, 1) + b"\x01"
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", gg.ARRAY, 1) + inner
    return meta(gg, gg.kv("deep", gg.ARRAY, inner))


Builder = Callable[[Any], bytes]
ALIGN = "general.alignment"

# id -> (builder, phrases expected in the message)
CASES: dict[str, tuple[Builder, tuple[str, ...]]] = {
    # G1 magic / size
    "empty": (lambda gg: b"", ("0 bytes", "empty or truncated")),
    "3-bytes": (lambda gg: b"GGU", ("3 bytes",)),
    "wrong-magic": (lambda gg: b"GGML" + bytes(40), ("not a GGUF file", "b'GGML'")),
    "fugg-magic": (lambda gg: b"FUGG" + bytes(40), ("big-endian", "little-endian")),
    # G2 versions
    "version-0": (lambda gg: gg.assemble([], [], version=0), ("unsupported GGUF version 0",)),
    "version-1": (lambda gg: gg.assemble([], [], version=1),
                  ("unsupported GGUF version 1", "re-convert")),
    "version-4": (lambda gg: gg.assemble([], [], version=4), ("unsupported GGUF version 4",)),
    "version-0x30000000": (lambda gg: gg.assemble([], [], version=0x30000000), ("endianness",)),
    # G3 counts beyond the file
    "n_kv-2^63": (lambda gg: gg.assemble([], [], n_kv=1 << 63),
                  ("metadata entries", "at byte 8")),
    "n_tensors-2^63": (lambda gg: gg.assemble([], [], n_tensors=1 << 63),
                       ("tensors need at least",)),
    "n_kv-0xffffffff-64-bytes": (lambda gg: gg.assemble([], [], n_kv=0xFFFFFFFF) + bytes(64),
                                 ("4294967295 metadata entries",)),
    # G4 lengths beyond the file
    "key-length-0xffffffffffff": (lambda gg: meta(gg, struct.pack("<Q", 0xFFFFFFFFFFFF) + b"abcd"),
                                  ("metadata key #0 at byte 24", "needs 281474976710655 bytes")),
    "string-length-2^63": (lambda gg: meta(gg, gg.kv("s", gg.STRING, struct.pack("<Q", 1 << 63))),
                           ("metadata 's'", "needs 9223372036854775808 bytes")),
    "string-past-eof": (lambda gg: meta(gg, gg.kv("s", gg.STRING, gg.gstr(b"x" * 100)[:18])),
                        ("needs 100 bytes",)),
    # G5 arrays
    "array-length-2^63": (lambda gg: array(gg, "a", gg.UINT8, 1 << 63),
                          ("array length 9223372036854775808",)),
    "string-array-past-eof": (lambda gg: array(gg, "a", gg.STRING, 1000), ("array length 1000",)),
    "nested-10000": (lambda gg: nested_arrays(gg, 10_000), ("array of arrays",)),
    "nested-2": (lambda gg: nested_arrays(gg, 2), ("array of arrays",)),
    "array-item-type-99": (lambda gg: array(gg, "a", 99, 0), ("unknown array item type 99",)),
    # G6 names
    "empty-key": (lambda gg: meta(gg, gg.kv_u32("", 1)), ("empty key",)),
    "duplicate-key": (lambda gg: meta(gg, gg.kv_u32("k", 1), gg.kv_u32("k", 2)),
                      ("metadata key 'k'", "duplicate key")),
    "key-invalid-utf8": (lambda gg: meta(gg, gg.kv_u32(b"k\xff\xfe", 1)), ("invalid UTF-8",)),
    "value-invalid-utf8": (lambda gg: meta(gg, gg.kv_str("k", b"\xc0\x80")),
                           ("metadata 'k'", "invalid UTF-8")),
    "tensor-name-invalid-utf8": (lambda gg: one_tensor(gg, [8], name=b"t\xed\xa0\x80"),
                                 ("tensor #0 name at byte 24", "invalid UTF-8")),
    "tensor-name-64-bytes": (lambda gg: one_tensor(gg, [8], name="n" * 64),
                             ("is 64 bytes long", "at most 63 allowed")),
    "tensor-name-empty": (lambda gg: one_tensor(gg, [8], name=""), ("empty tensor name",)),
    "duplicate-tensor": (lambda gg: two_tensors(gg, ("t", 8, 0), ("t", 8, 32), 64),
                         ("tensor 't'", "duplicate tensor name")),
    # G7 unknown types (and values no type allows)
    "value-type-99": (lambda gg: meta(gg, gg.kv("k", 99, bytes(8))), ("unknown value type 99",)),
    "tensor-type-255": (lambda gg: one_tensor(gg, [8], type_id=255),
                        ("unknown ggml tensor type 255",)),
    "tensor-type-removed-4": (lambda gg: one_tensor(gg, [32], type_id=4),
                              ("unknown ggml tensor type 4",)),
    "bool-value-2": (lambda gg: meta(gg, gg.kv("b", gg.BOOL, b"\x02")), ("BOOL value is 2",)),
    "bool-array-value-7": (lambda gg: array(gg, "b", gg.BOOL, 2, b"\x01\x07"), ("BOOL array",)),
    # G8 alignment
    "alignment-int32": (lambda gg: meta(gg, gg.kv(ALIGN, gg.INT32, struct.pack("<i", 32))),
                        ("general.alignment", "type is INT32, must be UINT32", "at byte 24")),
    "alignment-0": (lambda gg: meta(gg, gg.kv_u32(ALIGN, 0)), ("value 0 is not a power of two",)),
    "alignment-3": (lambda gg: meta(gg, gg.kv_u32(ALIGN, 3)), ("value 3 is not a power of two",)),
    "alignment-2^31": (lambda gg: meta(gg, gg.kv_u32(ALIGN, 1 << 31)), ("2147483648",)),
    # G9 n_dims
    "n_dims-0": (lambda gg: one_tensor(gg, [], n_dims=0), ("n_dims = 0",)),
    "n_dims-5": (lambda gg: one_tensor(gg, [1, 1, 1, 1, 8]), ("n_dims = 5",)),
    "n_dims-1000000": (lambda gg: one_tensor(gg, [8], n_dims=1_000_000), ("n_dims = 1000000",)),
    "n_dims-0xffffffff": (lambda gg: one_tensor(gg, [8], n_dims=0xFFFFFFFF),
                          ("n_dims = 4294967295",)),
    # G10 element counts (the first product wraps to 4 in uint64)
    "dims-wrap-to-4": (lambda gg: one_tensor(gg, [4194305, 4194305, 211106198978564]),
                       ("not representable",)),
    "dims-int64max-x2": (lambda gg: one_tensor(gg, [I64_MAX, 2, 1, 1]), ("not representable",)),
    "dim-zero": (lambda gg: one_tensor(gg, [8, 0]), ("ne[1] = 0",)),
    "dim-sign-bit": (lambda gg: one_tensor(gg, [1 << 63]), ("ne[0] = 9223372036854775808",)),
    # G11 quantised row length
    "q4_1-ne0-48": (lambda gg: one_tensor(gg, [48, 2], type_id=3),
                    ("ne[0] = 48", "Q4_1 block size 32")),
    "q4_k-ne0-32": (lambda gg: one_tensor(gg, [32], type_id=12), ("Q4_K block size 256",)),
    # G12 placement
    "offset-unaligned": (lambda gg: one_tensor(gg, [8], offset=4, data=bytes(64)),
                         ("offset 4 is not a multiple of the alignment 32",)),
    "offset-past-eof": (lambda gg: one_tensor(gg, [8], offset=1 << 40), ("runs past the end",)),
    "data-truncated": (lambda gg: gg.f32_file()[:-10],
                       ("tensor 't1'", "runs past the end", "re-download")),
    "overlap": (lambda gg: two_tensors(gg, ("a", 16, 0), ("b", 8, 32), 96),
                ("tensor 'b'", "overlaps tensor 'a'")),
    "overlap-same-offset": (lambda gg: two_tensors(gg, ("a", 8, 0), ("b", 8, 0), 32),
                            ("overlaps",)),
    # G13 a byte size that wraps size_t in C
    "f32-ne0-size_max/4": (lambda gg: one_tensor(gg, [U64_MAX // 4]),
                           ("larger than the whole file",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_raises_model_format_error(case: str, gg: Any, write: Any) -> None:
    build, phrases = CASES[case]
    expect_error(write(build(gg)), *phrases)


def test_wrap_shape_really_wraps() -> None:
    """The G10 dims are the published shape: their product is 4 modulo 2**64."""
    assert (4194305 * 4194305 * 211106198978564) % (1 << 64) == 4


def test_real_big_endian_file_is_rejected_clearly(make_tiny: Any, tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    make_tiny(path, endianess=gguf.GGUFEndian.BIG)
    expect_error(path, "byte-swapped", "would be 3 big-endian", "little-endian")


def test_missing_file_is_a_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="cannot open"):
        read_gguf(tmp_path / "absent.gguf")


# ---------------------------------------------------------------------------------------------
# shapes that are odd but valid: the lenient side of the policy


def test_empty_model_loads(gg: Any, write: Any) -> None:
    with read_gguf(write(gg.assemble([], []))) as f:
        assert f.metadata == {} and f.tensors == {} and f.version == 3


def test_name_of_63_bytes_loads(gg: Any, write: Any) -> None:
    with read_gguf(write(one_tensor(gg, [8], name="n" * 63))) as f:
        assert list(f.tensors) == ["n" * 63]


def test_gap_between_tensors_is_allowed(gg: Any, write: Any) -> None:
    """G12 policy: lenient on gaps (llama.cpp demands an exact running sum; we do not)."""
    data = np.arange(8, dtype="<f4").tobytes().ljust(96, b"\0") + np.full(8, 7, "<f4").tobytes()
    path = write(gg.assemble([], [gg.tinfo("a", [8], 0, 0), gg.tinfo("b", [8], 0, 96)], data))
    with read_gguf(path) as f:
        assert f.tensor("b").tolist() == [7.0] * 8 and f.tensor("a")[3].item() == 3.0


def test_offsets_out_of_table_order_are_allowed(gg: Any, write: Any) -> None:
    data = np.full(8, 1, "<f4").tobytes() + np.full(8, 2, "<f4").tobytes()
    infos = [gg.tinfo("second", [8], 0, 32), gg.tinfo("first", [8], 0, 0)]
    path = write(gg.assemble([], infos, data))
    with read_gguf(path) as f:
        assert list(f.tensors) == ["second", "first"]  # file (table) order kept
        assert f.tensor("second").tolist() == [2.0] * 8 and f.tensor("first").tolist() == [1.0] * 8


def test_custom_alignment_is_honoured(gg: Any, write: Any) -> None:
    kvs = [gg.kv_u32("general.alignment", 64)]
    data = np.arange(8, dtype="<f4").tobytes().ljust(64, b"\0") + np.full(8, 5, "<f4").tobytes()
    infos = [gg.tinfo("a", [8], 0, 0), gg.tinfo("b", [8], 0, 64)]
    path = write(gg.assemble(kvs, infos, data, alignment=64))
    with read_gguf(path) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        assert f.tensor("b").tolist() == [5.0] * 8
    expect_error(write(gg.assemble(kvs, [gg.tinfo("a", [8], 0, 32)], bytes(96), alignment=64)),
                 "offset 32 is not a multiple of the alignment 64")


# ---------------------------------------------------------------------------------------------
# G18: fuzzing a valid tiny GGUF


def load_everything(path: Path) -> str:
    """Parse, then read and dequantise every tensor: 'ok', 'error' (typed), or it raises."""
    try:
        with read_gguf(path) as f:
            for name in f.tensors:
                f.raw(name)
                try:
                    f.tensor(name)
                except ModelFormatError:
                    pass  # e.g. a type mutated into one we cannot dequantise
    except ModelFormatError:
        return "error"
    return "ok"


def integer_fields(path: Path) -> list[tuple[int, int, int]]:
    """(byte offset, width, value) of every integer field in the header, found by gguf-py."""
    reader = gguf.GGUFReader(str(path))
    base = reader.data.__array_interface__["data"][0]
    found: list[tuple[int, int, int]] = []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for field in fields:
        for part in field.parts:
            if part.dtype.kind in "iu" and part.dtype.itemsize in (4, 8):
                start = part.__array_interface__["data"][0] - base
                for i, v in enumerate(part.tolist()):
                    found.append((start + i * part.dtype.itemsize, part.dtype.itemsize, int(v)))
    return found


def run_cases(mutations: list[tuple[str, bytes]], path: Path) -> dict[str, int]:
    """Every mutation must load or raise ModelFormatError, each in under a second."""
    outcomes = {"ok": 0, "error": 0}
    problems = []
    for label, data in mutations:
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            outcomes[load_everything(path)] += 1
        except Exception as e:  # anything untyped is exactly what this test hunts
            problems.append(f"{label}: {type(e).__name__}: {e}")
        if time.perf_counter() - start > 1.0:
            problems.append(f"{label}: slow ({time.perf_counter() - start:.2f} s)")
    assert not problems, "\n".join(problems[:20])
    return outcomes


def test_fuzz_random_byte_mutations(tiny_gguf: Path, tmp_path: Path) -> None:
    base = tiny_gguf.read_bytes()
    with read_gguf(tiny_gguf) as f:
        header_end = f.data_offset
    rng = random.Random(20240618)
    mutations = []
    for i in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(header_end) if rng.random() < 0.85 else rng.randrange(len(base))
            flip = data[pos] ^ (1 << rng.randrange(8))
            data[pos] = rng.randrange(256) if rng.random() < 0.5 else flip
        mutations.append((f"flip#{i}", bytes(data)))
    for i in range(40):
        mutations.append((f"truncate#{i}", base[:rng.randrange(len(base))]))
    mutations.append(("append", base + bytes(rng.randrange(256) for _ in range(100))))
    outcomes = run_cases(mutations, tmp_path / "fuzz.gguf")
    print(f"{len(mutations)} byte mutations: {outcomes}")
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes  # both paths exercised


def test_fuzz_structure_aware_field_mutations(tiny_gguf: Path, tmp_path: Path) -> None:
    base = tiny_gguf.read_bytes()
    fields = integer_fields(tiny_gguf)
    assert len(fields) > 60  # header counts, lengths, types, dims and offsets were all found
    rng = random.Random(7)
    mutations = []
    for off, width, value in fields:
        top = (1 << (8 * width)) - 1
        for new in {0, 1, value + 1, value - 1, value * 2 + 1, 1 << (8 * width - 1), top,
                    rng.randrange(top)}:
            data = bytearray(base)
            data[off:off + width] = (new & top).to_bytes(width, "little")
            mutations.append((f"field@{off}={new & top}", bytes(data)))
    outcomes = run_cases(mutations, tmp_path / "fuzz.gguf")
    print(f"{len(mutations)} field mutations: {outcomes}")
    assert outcomes["ok"] > 20 and outcomes["error"] > 200, outcomes
