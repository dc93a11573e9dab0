"""Layout conversions between file formats and qkv's one convention.

RoPE: qkv rotates the pair (x[i], x[i + D/2]) of each head (rotate-half, Hugging Face's layout).
llama.cpp's converter reorders the rows of the Q and K projections so that GGUF files rotate the
*interleaved* pairs (x[2i], x[2i + 1]). ``gguf_to_rotate_half`` undoes that reordering, once, at load.
"""

from __future__ import annotations

import torch

from ..errors import ModelFormatError


def gguf_to_rotate_half(w: torch.Tensor, n_heads: int, *, name: str = "weight") -> torch.Tensor:
    """Rows of a GGUF Q/K projection (H·D, …) -> rotate-half row order.

    Within each head, GGUF row 2i + j holds what rotate-half keeps at row j·D/2 + i (j ∈ {0, 1}).
    Works on any trailing shape (dequantised weights, per-row quantisation blocks, biases).
    """
    rows = w.shape[0]
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise ModelFormatError(f"{name}: {rows} rows cannot be split into {n_heads} heads of even size")
    d = rows // n_heads
    # (H, D/2, 2, …) -> (H, 2, D/2, …): pair members become the two halves
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotate_half_to_gguf(w: torch.Tensor, n_heads: int, *, name: str = "weight") -> torch.Tensor:
    """The inverse of :func:`gguf_to_rotate_half` (used when exporting to GGUF)."""
    rows = w.shape[0]
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise ModelFormatError(f"{name}: {rows} rows cannot be split into {n_heads} heads of even size")
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
