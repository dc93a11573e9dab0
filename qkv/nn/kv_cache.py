"""The KV cache: an explicit object with an offset, one per attention layer.

Legend: B batch, K kv heads, S cached positions, D head dim.

Decoding appends the new keys/values at ``offset`` and attends over ``[0, offset + T)``. Buffers are
allocated once at ``max_len``; going past it is an error, never a silent wrap-around (RELIABILITY K9).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError


class KVCache:
    """Preallocated keys and values of one layer: ``k``, ``v`` of shape (B, K, max_len, D).

    ``cross=True`` marks a cache of an encoder context for cross-attention: filled on the first call,
    then reused as it is by every decoding step.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", v_dim: int | None = None,
                 cross: bool = False):
        if min(batch, n_kv_heads, max_len, head_dim) <= 0:
            raise ShapeError(f"KVCache sizes must be positive: batch={batch}, n_kv_heads={n_kv_heads}, "
                             f"max_len={max_len}, head_dim={head_dim}")
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv_heads, max_len, v_dim or head_dim, dtype=dtype, device=device)
        self.offset = 0
        self.cross = cross  # holds a fixed cross-attention context, filled once, then only read

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, K, T, D) at ``offset``; return all cached (B, K, offset + T, D); advance."""
        t = k.shape[2]
        end = self.offset + t
        if end > self.max_len:
            raise ShapeError(f"KV cache full: {self.offset} cached + {t} new > max_len {self.max_len}; "
                             "make a larger cache or shorten the prompt / max_new_tokens")
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise ShapeError(f"KV cache holds (B, K, *, D) = {tuple(self.k.shape)}, got keys {tuple(k.shape)}")
        self.k[:, :, self.offset:end] = k
        self.v[:, :, self.offset:end] = v
        self.offset = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget everything cached (the buffers are reused)."""
        self.offset = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Row i takes over the cached positions of row ``index[i]`` (B,); the offset stays.

        Beam search calls this after each step so that every surviving beam carries its parent's history.
        Only the filled positions ``[0, offset)`` are copied.
        """
        b = self.k.shape[0]
        if index.dim() != 1 or index.shape[0] != b:
            raise ShapeError(f"KVCache.reorder needs one row index per batch row ({b}), got shape {tuple(index.shape)}")
        index, n = index.to(self.k.device), self.offset
        self.k[:, :, :n] = self.k[:, :, :n].index_select(0, index)  # (B, K, offset, D)
        self.v[:, :, :n] = self.v[:, :, :n].index_select(0, index)

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` positions (e.g. to re-run from a shared prefix)."""
        if not 0 <= length <= self.offset:
            raise ShapeError(f"cannot crop a cache of {self.offset} positions to {length}")
        self.offset = length
