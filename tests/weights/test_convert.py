"""The GGUF <-> rotate-half Q/K row permutation, checked against RoPE itself."""

from __future__ import annotations

import pytest
import torch

from qkv.errors import ModelFormatError
from qkv.weights.convert import gguf_to_rotate_half, rotate_half_to_gguf


def interleaved_rope(x, pos, theta=10000.0):
    """RoPE on pairs (x[2i], x[2i+1]) — the layout GGUF's rows are stored for (written independently)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permutation_turns_interleaved_rope_into_rotate_half():
    from qkv.nn import RoPE

    torch.manual_seed(0)
    h, d, c = 3, 8, 10
    w_gguf = torch.randn(h * d, c, dtype=torch.float64)
    x = torch.randn(5, c, dtype=torch.float64)
    pos = torch.arange(5)
    ref = interleaved_rope((x @ w_gguf.T).view(5, h, d).transpose(0, 1), pos)  # (H, T, D) GGUF layout
    ours = RoPE(d)((x @ gguf_to_rotate_half(w_gguf, h).T).view(5, h, d).transpose(0, 1).float(), pos)
    # same rotated vectors, up to the within-head reordering of the coordinates
    torch.testing.assert_close(ours.double(), gguf_to_rotate_half(ref.transpose(-1, -2).reshape(h, d, 5).reshape(
        h * d, 5), h).reshape(h, d, 5).transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_round_trip_and_errors():
    w = torch.randn(24, 7)
    assert torch.equal(rotate_half_to_gguf(gguf_to_rotate_half(w, 3), 3), w)
    assert not torch.equal(gguf_to_rotate_half(w, 3), w)
    with pytest.raises(ModelFormatError, match="heads of even size"):
        gguf_to_rotate_half(torch.randn(9, 2), 3)
