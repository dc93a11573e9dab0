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
