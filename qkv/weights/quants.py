"""GGML tensor types and their dequantisation to float32.

The type table is data: every ggml type id we know, with its block size (elements per block)
and type size (bytes per block), so the GGUF reader can check a tensor's byte size for any
known type — even one we cannot dequantise. Dequantisers exist for the types real Llama-family
GGUFs use; each is a handful of whole-tensor torch ops (no Python loop over blocks), because the
embedded model's 272 tensors (~135M weights) must dequantise in well under two seconds.

NumPy rather than torch: these passes are memory-bound, so one thread is nearly as fast as
several, and it stays fast when the cores are busy (torch's intra-op threads, oversubscribed on
a shared 2-core machine, made the same work 5-20x slower in our measurements).

Bit-exactness: every dequantiser does the same IEEE float32 operations in the same order as
gguf-py's ``gguf.quants.dequantize`` (e.g. ``d * q + m`` as a multiply then an add, never a fused
multiply-add), so the results are equal bit for bit; the tests hold us to that.

Block layouts follow ggml's ``block_q*`` structs (all little-endian). Within a 32-element group
packed as nibbles, the low nibbles of 16 bytes are elements 0..15 and the high nibbles 16..31.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

QK_K = 256  # elements per super-block of the k-quants


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: ``block_size`` elements are stored in ``type_size`` bytes."""

    type_id: int
    name: str
    block_size: int
    type_size: int


def _table(*rows: tuple[int, str, int, int]) -> dict[int, GGMLType]:
    return {r[0]: GGMLType(*r) for r in rows}


# ids 4, 5 (Q4_2/Q4_3) and 31-33, 36-38 (repacked variants) were removed from ggml; files using
# them are rejected as unknown. Q8_1 (id 9) is left out too: it is a scratch type for dot
# products, never stored in files, and its size differs between ggml (36) and gguf-py (40).
GGML_TYPES: dict[int, GGMLType] = _table(
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34),
    (10, "Q2_K", QK_K, 84), (11, "Q3_K", QK_K, 110), (12, "Q4_K", QK_K, 144),
    (13, "Q5_K", QK_K, 176), (14, "Q6_K", QK_K, 210), (15, "Q8_K", QK_K, 292),
    (16, "IQ2_XXS", QK_K, 66), (17, "IQ2_XS", QK_K, 74), (18, "IQ3_XXS", QK_K, 98),
    (19, "IQ1_S", QK_K, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", QK_K, 110),
    (22, "IQ2_S", QK_K, 82), (23, "IQ4_XS", QK_K, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", QK_K, 56),
    (30, "BF16", 1, 2), (34, "TQ1_0", QK_K, 54), (35, "TQ2_0", QK_K, 66),
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
)
GGML_TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}


# ---------------------------------------------------------------------------------------------
# small helpers shared by the block formats

_F32 = np.float32


def _f16(b: np.ndarray) -> np.ndarray:
    """(N, 2) uint8 little-endian half floats -> (N, 1) float32 (exact widening)."""
    return np.ascontiguousarray(b).view("<f2").astype(_F32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., L) uint8 -> (..., 2, L) uint8: low nibbles first, then high nibbles."""
    return np.stack((qs & np.uint8(0x0F), qs >> np.uint8(4)), axis=-2)


def _bits(b: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """(..., L) uint8 -> (..., len(shifts), L): the ``mask``-wide field at each shift."""
    sh = np.array(shifts, dtype=np.uint8).reshape(-1, 1)
    return (b[..., None, :] >> sh) & np.uint8(mask)


def _bits_of_u32(b: np.ndarray) -> np.ndarray:
    """(N, 4) uint8 holding a little-endian uint32 -> (N, 32) uint8 of its bits, bit 0 first."""
    return ((b[:, :, None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)).reshape(-1, 32)


def _kquant_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (N, 8) float32.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 take their low
    4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-3 / 4-7.
    """
    lo, mi, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = np.concatenate((lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)), axis=1)
    mins = np.concatenate((mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)), axis=1)
    return scales.astype(_F32), mins.astype(_F32)


def _q3k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: 12 bytes -> sixteen signed 6-bit scales as (N, 16) float32 (stored offset by 32).

    Bytes 0-7 give the low 4 bits (low nibbles: scales 0-7, high nibbles: 8-15); bytes 8-11 give
    the top 2 bits, four per byte, scale ``j`` in byte ``8 + j % 4`` at bit ``2 * (j // 4)``.
    """
    low = _nibbles(sc[:, 0:8]).reshape(-1, 16)
    high = _bits(sc[:, 8:12], [0, 2, 4, 6], 0x03).reshape(-1, 16)
    return ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(_F32)


# ---------------------------------------------------------------------------------------------
# one function per type: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32


def _deq_f32(b: np.ndarray) -> np.ndarray:
    return b.view("<f4").copy()  # a copy: never hand out a view of a read-only mapping


def _deq_f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(_F32)


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32; a shift keeps NaN payloads exactly as gguf-py does
    return (b.view("<i2").astype(np.int32) << 16).view(_F32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(_F32) * _f16(b[:, 0:2])


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:]).reshape(-1, 32).view(np.int8) - np.int8(8)
    return _f16(b[:, 0:2]) * q.astype(_F32)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    # the embedded model's main type, so it is hot: nibbles go straight into the output
    qs = b[:, 4:]
    out = np.empty((b.shape[0], 2, 16), dtype=_F32)
    np.bitwise_and(qs, np.uint8(0x0F), out=out[:, 0], casting="unsafe")
    np.right_shift(qs, np.uint8(4), out=out[:, 1], casting="unsafe")
    out = out.reshape(-1, 32)
    out *= _f16(b[:, 0:2])
    out += _f16(b[:, 2:4])
    return out


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: the 5-bit values 0..31 as (N, 32) uint8 (4 low bits in qs, bit 4 in qh)."""
    return _nibbles(qs).reshape(-1, 32) | (_bits_of_u32(qh) << np.uint8(4))


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    q = _q5_values(b[:, 2:6], b[:, 6:]).view(np.int8) - np.int8(16)
    return _f16(b[:, 0:2]) * q.astype(_F32)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    q = _q5_values(b[:, 4:8], b[:, 8:]).astype(_F32)
    return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])


def _deq_q2_k(b: np.ndarray) -> np.ndarray:
    # layout: scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), d, dmin
    sc, d, dmin = b[:, 0:16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & np.uint8(0x0F)).astype(_F32))[:, :, None]  # (N, 16, 1)
    ml = (dmin * (sc >> np.uint8(4)).astype(_F32))[:, :, None]
    q = _bits(b[:, 16:80].reshape(-1, 2, 32), [0, 2, 4, 6], 0x03)  # (N, 2, 4, 32)
    return (dl * q.reshape(-1, 16, 16).astype(_F32) - ml).reshape(-1, QK_K)


def _deq_q3_k(b: np.ndarray) -> np.ndarray:
    # layout: hmask[32], qs[64] (low 2 bits), scales[12], d; a clear hmask bit subtracts 4
    dl = (_f16(b[:, 108:110]) * _q3k_scales(b[:, 96:108]))[:, :, None]  # (N, 16, 1)
    low = _bits(b[:, 32:96].reshape(-1, 2, 32), [0, 2, 4, 6], 0x03).reshape(-1, QK_K)
    high = _bits(b[:, 0:32], list(range(8)), 0x01).reshape(-1, QK_K)
    q = low.view(np.int8) - ((high ^ np.uint8(1)) << np.uint8(2)).view(np.int8)
    return (dl * q.reshape(-1, 16, 16).astype(_F32)).reshape(-1, QK_K)


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    # layout: d, dmin, scales[12], qs[128]; eight sub-blocks of 32
    sc, mn = _kquant_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc)[:, :, None]  # (N, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn)[:, :, None]
    q = _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32).astype(_F32)
    return (d * q - dm).reshape(-1, QK_K)


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    # layout: d, dmin, scales[12], qh[32] (bit 4; sub-block j uses bit j), qs[128]
    sc, mn = _kquant_scales(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc)[:, :, None]
    dm = (_f16(b[:, 2:4]) * mn)[:, :, None]
    low = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = _bits(b[:, 16:48], list(range(8)), 0x01)  # (N, 8, 32)
    q = (low | (high << np.uint8(4))).astype(_F32)
    return (d * q - dm).reshape(-1, QK_K)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    # layout: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d; two halves of 128
    scale = b[:, 192:208].view(np.int8).astype(_F32)
    d = (_f16(b[:, 208:210]) * scale)[:, :, None]  # (N, 16, 1)
    low = _nibbles(b[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), [0, 2, 4, 6], 0x03).reshape(-1, 8, 32)
    q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
    return (d * q.reshape(-1, 16, 16).astype(_F32)).reshape(-1, QK_K)


DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _deq_f32, "F16": _deq_f16, "BF16": _deq_bf16, "Q8_0": _deq_q8_0,
    "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1,
    "Q2_K": _deq_q2_k, "Q3_K": _deq_q3_k, "Q4_K": _deq_q4_k, "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}


def can_dequantize(type_name: str) -> bool:
    """Whether :func:`dequantize` supports this ggml type name."""
    return type_name in DEQUANTIZERS


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Dequantise the bytes of a whole tensor of ``type_name`` to a new flat float32 array.

    ``raw`` is 1-D uint8 (it may be a read-only memory map; the result never aliases it) whose
    length is a whole number of blocks. Raises ``ValueError`` for an unsupported type or a
    ragged byte count — the GGUF reader has ruled both out before calling.
    """
    fn = DEQUANTIZERS.get(type_name)
    if fn is None:
        raise ValueError(f"no dequantiser for ggml type {type_name}")
    t = GGML_TYPES_BY_NAME[type_name]
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size % t.type_size:
        raise ValueError(f"{type_name} data must be 1-D uint8 of whole {t.type_size}-byte blocks")
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales give NaN, as in ggml
        return fn(raw.reshape(-1, t.type_size)).reshape(-1)
