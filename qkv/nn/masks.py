"""Attention masks: validation and construction.

Legend: B batch, H heads, T queries, S keys.

Conventions (one for the whole library):

* A **boolean** mask says where attention is *allowed*: ``True`` = attend, ``False`` = masked.
* A **float** mask is *added* to the scores; ``-inf`` masks a position completely.
* Masks broadcast to ``(B, H, T, S)``: a padding mask over keys is ``(B, 1, 1, S)``.
* ``causal=True`` is aligned **bottom-right**: query ``i`` sees keys ``j <= S - T + i``. With ``T == S``
  this is the usual lower triangle; with ``T < S`` (a KV-cache decode or chunked-prefill step) the
  last query sees every key, which is what cached decoding needs.
* ``window=W`` (sliding window) additionally hides keys more than ``W - 1`` positions before the query.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError


def check_mask(mask: torch.Tensor, shape: tuple[int, int, int, int], device: torch.device) -> None:
    """Raise ShapeError unless ``mask`` is a bool/float tensor on ``device`` that broadcasts to ``shape``."""
    if not isinstance(mask, torch.Tensor):
        raise ShapeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ShapeError(
            f"mask dtype {mask.dtype} is not supported: use a bool mask (True = attend) "
            "or a float mask added to the scores (-inf = masked)"
        )
    if mask.device != device:
        raise ShapeError(f"mask is on {mask.device} but q/k/v are on {device}: move it with mask.to(q.device)")
    if mask.dim() > 4 or not _broadcasts(tuple(mask.shape), shape):
        raise ShapeError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, T, S) = {shape}; "
            "a key-padding mask is (B, 1, 1, S), a per-query mask (B, 1, T, S)"
        )


def _broadcasts(small: tuple[int, ...], full: tuple[int, ...]) -> bool:
    """True if ``small`` broadcasts to ``full`` without ``full`` changing (right-aligned, 1 or equal)."""
    for a, b in zip(reversed(small), reversed(full)):
        if a != 1 and a != b:
            return False
    return True


def causal_mask(
    t: int, s: int, *, device: torch.device | None = None, window: int | None = None,
    q_start: int = 0, k_start: int = 0, q_len: int | None = None, k_len: int | None = None,
) -> torch.Tensor:
    """Bool (Tq, Sk) mask, True = attend, for the block of queries [q_start, q_start+q_len) and keys
    [k_start, k_start+k_len) of a T x S causal problem aligned bottom-right.

    The block arguments let the tiled path build only the part of the mask it needs.
    """
    q_len = t - q_start if q_len is None else q_len
    k_len = s - k_start if k_len is None else k_len
    qi = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1) + (s - t)  # (Tq, 1) absolute
    kj = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)  # (1, Sk)
    allowed = kj <= qi
    if window is not None:
        allowed &= kj > qi - window
    return allowed


def window_mask(
    t: int, s: int, window: int, *, device: torch.device | None = None,
    q_start: int = 0, k_start: int = 0, q_len: int | None = None, k_len: int | None = None,
) -> torch.Tensor:
    """Bool (Tq, Sk) mask for a two-sided sliding window (non-causal): |pos_q - pos_k| < window."""
    q_len = t - q_start if q_len is None else q_len
    k_len = s - k_start if k_len is None else k_len
    qi = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1) + (s - t)
    kj = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)
    return (qi - kj).abs() < window


def structural_mask(
    t: int, s: int, *, causal: bool, window: int | None, device: torch.device | None = None, **block
) -> torch.Tensor | None:
    """The causal and/or window part of a mask as bool (T, S), or None when there is none."""
    if causal:
        return causal_mask(t, s, device=device, window=window, **block)
    if window is not None:
        return window_mask(t, s, window, device=device, **block)
    return None


def combine(mask: torch.Tensor | None, structure: torch.Tensor | None) -> torch.Tensor | None:
    """Merge a user mask (bool or additive float) with a bool structural mask into one mask.

    Bool & bool stays bool. For a float mask the structural part becomes ``-inf`` where masked, so a
    masked position is never the sum of two saturated values (RELIABILITY A8).
    """
    if structure is None:
        return mask
    if mask is None:
        return structure
    if mask.dtype == torch.bool:
        return mask & structure
    return mask.masked_fill(~structure, float("-inf"))


def padding_mask(lengths: torch.Tensor, s: int) -> torch.Tensor:
    """Key-padding mask (B, 1, 1, S), True where key j < lengths[b] (right padding)."""
    j = torch.arange(s, device=lengths.device)
    return (j.unsqueeze(0) < lengths.unsqueeze(1))[:, None, None, :]
