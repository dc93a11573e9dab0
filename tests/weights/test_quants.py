"""Dequantisation: bit-exact against gguf-py's ``dequantize``, plus hand-worked blocks.

gguf-py is the oracle for the block layouts; the hand-worked blocks pin a few values
independently of it, so a change in both would still be caught.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from qkv.weights.quants import (DEQUANTIZERS, GGML_TYPES, GGML_TYPES_BY_NAME, can_dequantize,
                                dequantize)

import gguf  # a dev dependency: a missing install must fail, not skip

ALL = sorted(DEQUANTIZERS)
QUANTIZABLE = ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf-py can quantise these
# byte offsets of the f16 (or f32) scale fields of each block layout
SCALE_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
                "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def oracle(raw: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's dequantisation of (n_blocks, type_size) bytes, flattened."""
    qtype = gguf.GGMLQuantizationType[name]
    if name == "F32":
        return raw.reshape(-1).view(np.float32).copy()
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)


def sane_blocks(rng: np.random.Generator, name: str, n_blocks: int) -> np.ndarray:
    """Random blocks whose scale fields are finite halves (as any real file has)."""
    t = GGML_TYPES_BY_NAME[name]
    b = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    if name in ("F16", "BF16", "F32"):
        vals = rng.standard_normal(n_blocks * t.block_size).astype(np.float32) * 10
        enc = {"F32": vals, "F16": vals.astype(np.float16),
               "BF16": (vals.view(np.uint32) >> 16).astype(np.uint16)}[name]
        return enc.view(np.uint8).reshape(n_blocks, t.type_size)
    for off in SCALE_FIELDS[name]:
        scale = (rng.standard_normal(n_blocks) * 0.1).astype(np.float16)
        b[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return b


def assert_bits_equal(got: np.ndarray, ref: np.ndarray) -> None:
    """Equal bit patterns, NaN payloads included (both sides are the same NumPy operations)."""
    assert got.shape == ref.shape and got.dtype == np.float32
    bad = got.view(np.uint32) != ref.view(np.uint32)
    assert not bad.any(), f"{bad.sum()} values differ, first at {np.flatnonzero(bad)[:5]}: " \
                          f"{got[bad][:5]} vs {ref[bad][:5]}"


@pytest.mark.parametrize("name", ALL)
def test_random_sane_blocks_match_gguf_bit_exactly(name: str) -> None:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    raw = sane_blocks(rng, name, 97)
    assert_bits_equal(dequantize(raw.reshape(-1), name), oracle(raw, name))


@pytest.mark.parametrize("name", ALL)
def test_arbitrary_bytes_match_gguf_including_inf_and_nan(name: str) -> None:
    """Fully random bytes: scales may be inf, NaN or subnormal halves."""
    rng = np.random.default_rng(7 + len(name))
    raw = rng.integers(0, 256, (301, GGML_TYPES_BY_NAME[name].type_size), dtype=np.uint8)
    assert_bits_equal(dequantize(raw.reshape(-1), name), oracle(raw, name))


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_gguf_quantised_data_round_trips_bit_exactly(name: str) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    got = dequantize(q.reshape(-1), name).reshape(x.shape)
    ref = oracle(q.reshape(-1, GGML_TYPES_BY_NAME[name].type_size), name).reshape(x.shape)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert np.abs(got - x).max() < np.abs(x).max() * 0.2  # and it is a real reconstruction


def half(v: float) -> bytes:
    return np.float16(v).tobytes()


def test_hand_worked_q8_0() -> None:
    qs = np.arange(-16, 16, dtype=np.int8)
    raw = np.frombuffer(half(0.5) + qs.tobytes(), dtype=np.uint8)
    np.testing.assert_array_equal(dequantize(raw, "Q8_0"), qs.astype(np.float32) * 0.5)


def test_hand_worked_q4_0_and_q4_1_nibble_order() -> None:
    # byte j holds element j in its low nibble and element j + 16 in its high nibble
    qs = bytes((j & 0xF) | ((15 - j) << 4) for j in range(16))
    expect = np.array(list(range(16)) + [15 - j for j in range(16)], dtype=np.float32)
    q40 = np.frombuffer(half(2.0) + qs, dtype=np.uint8)
    np.testing.assert_array_equal(dequantize(q40, "Q4_0"), (expect - 8) * 2)
    q41 = np.frombuffer(half(0.25) + half(-1.0) + qs, dtype=np.uint8)
    np.testing.assert_array_equal(dequantize(q41, "Q4_1"), expect * 0.25 - 1)


def test_hand_worked_q5_0_high_bits() -> None:
    qh = struct.pack("<I", 0x8000_0001)  # bit 4 set for elements 0 and 31
    raw = np.frombuffer(half(1.0) + qh + bytes(16), dtype=np.uint8)
    expect = np.full(32, -16.0, dtype=np.float32)
    expect[[0, 31]] = 0.0
    np.testing.assert_array_equal(dequantize(raw, "Q5_0"), expect)


def test_hand_worked_q6_k_constant_block() -> None:
    # ql = 0x11, qh = 0b10101010: every q is 1 | (2 << 4) = 33 -> 33 - 32 = 1
    raw = bytes([0x11] * 128) + bytes([0xAA] * 64) + bytes([3] * 16) + half(0.5)
    out = dequantize(np.frombuffer(raw, dtype=np.uint8), "Q6_K")
    np.testing.assert_array_equal(out, np.full(256, 1.5, dtype=np.float32))


def test_type_table_matches_gguf_constants() -> None:
    for type_id, t in GGML_TYPES.items():
        qtype = gguf.GGMLQuantizationType(type_id)
        assert qtype.name == t.name
        assert gguf.GGML_QUANT_SIZES[qtype] == (t.block_size, t.type_size), t.name


def test_removed_type_ids_are_unknown() -> None:
    for type_id in (4, 5, 9, 31, 32, 33, 36, 37, 38, 255):
        assert type_id not in GGML_TYPES


def test_unsupported_type_and_ragged_bytes_raise() -> None:
    assert not can_dequantize("IQ2_XXS") and can_dequantize("Q4_1")
    with pytest.raises(ValueError, match="no dequantiser"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS")
    with pytest.raises(ValueError, match="whole 20-byte blocks"):
        dequantize(np.zeros(21, np.uint8), "Q4_1")


@pytest.mark.parametrize("name", ALL)
def test_result_is_new_writable_memory(name: str) -> None:
    t = GGML_TYPES_BY_NAME[name]
    raw = sane_blocks(np.random.default_rng(5), name, 3).reshape(-1)
    raw.flags.writeable = False
    out = dequantize(raw, name)
    assert out.dtype == np.float32 and out.shape == (3 * t.block_size,)
    assert out.flags.writeable and not np.shares_memory(out, raw)
