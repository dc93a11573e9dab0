"""4-bit GGUF blocks (Q4_0, Q4_1) as codes, scales and zeros — the input of qkv.nn.quant.QuantizedLinear.

A block holds 32 weights of one row: an fp16 scale d (and for Q4_1 an fp16 minimum m) then 16 bytes of
nibbles, weight j in the low nibble of byte j and weight j + 16 in the high nibble. The value is
``d · (q - 8)`` for Q4_0 and ``d · q + m`` for Q4_1; both are written here as ``(q - 8) · scale + zero``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelFormatError

INT4_TYPES = {"Q4_0": 18, "Q4_1": 20}  # bytes per block of 32
GROUP = 32


def int4_codes(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...], *, name: str = "tensor"):
    """(codes uint8 (N, K) in 0..15, scale float32 (N, K/32), zero float32 (N, K/32)) of a 2-d tensor."""
    if ggml_type not in INT4_TYPES or len(shape) != 2 or shape[1] % GROUP:
        raise ModelFormatError(f"{name}: {ggml_type} {shape} is not a 2-d Q4_0/Q4_1 matrix with rows of 32k")
    n, k = shape
    size = INT4_TYPES[ggml_type]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n * (k // GROUP), size)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)[:, 0]
    if ggml_type == "Q4_1":
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)[:, 0]
        zero = m + 8 * d
        qs = blocks[:, 4:]
    else:
        zero = np.zeros_like(d)
        qs = blocks[:, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (blocks, 32): low nibbles first
    return (torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d.reshape(n, k // GROUP)),
            torch.from_numpy(zero.reshape(n, k // GROUP)))


# -- exact dequantisation in torch (several threads, bitwise the values of qkv.weights.quants) ---------------

TORCH_DEQUANT = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # block bytes of the types dequantised here


def _f16_col(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian half floats -> (n, 1) float32 (exact widening)."""
    return b.contiguous().view(torch.float16).float()


def dequantize_into(blocks: torch.Tensor, ggml_type: str, out: torch.Tensor) -> torch.Tensor:
    """(n, block bytes) uint8 blocks -> ``out`` (n, 32) float32, in place, without temporaries the size of
    the output (a prompt dequantises every matrix: this is most of its cost). The same numbers as
    ``qkv.weights.quants.dequantize`` (the same operations in the same order: ``q · d`` for Q4_0/Q8_0,
    ``q · d + m`` for Q4_1)."""
    if ggml_type == "Q8_0":
        out.copy_(blocks[:, 2:].contiguous().view(torch.int8))
        return out.mul_(_f16_col(blocks[:, 0:2]))
    qs = blocks[:, 4:] if ggml_type == "Q4_1" else blocks[:, 2:]
    out[:, :16].copy_(qs & 0x0F)
    out[:, 16:].copy_(qs >> 4)
    if ggml_type == "Q4_0":
        return out.sub_(8).mul_(_f16_col(blocks[:, 0:2]))
    return out.mul_(_f16_col(blocks[:, 0:2])).add_(_f16_col(blocks[:, 2:4]))


def dequantize_rows(raw: torch.Tensor, ggml_type: str, shape: tuple[int, int],
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a 2-d (N, K) tensor stored as ``raw`` uint8 bytes -> float32 (len(rows) or N, K)."""
    n, k = shape
    per_row = k // 32 * TORCH_DEQUANT[ggml_type]
    r = raw.view(n, per_row)
    if rows is not None:
        r = r.index_select(0, rows)
    out = torch.empty(r.shape[0], k)
    dequantize_into(r.reshape(-1, TORCH_DEQUANT[ggml_type]), ggml_type, out.view(-1, 32))
    return out
