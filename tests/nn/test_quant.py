"""QuantizedLinear: exact float32 for long inputs, int4 / float16 copies for one-token steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.nn.quant import QuantizedLinear
from qkv.weights.int4 import int4_codes


def q4_1_blocks(n, k, seed=0):
    """Random Q4_1 bytes: per block fp16 d, fp16 m, 16 bytes of nibbles."""
    rng = np.random.default_rng(seed)
    blocks = np.zeros((n * k // 32, 20), dtype=np.uint8)
    blocks[:, 0:2] = (rng.random(len(blocks)) * 0.05).astype("<f2").reshape(-1, 1).view(np.uint8)
    blocks[:, 2:4] = (rng.standard_normal(len(blocks)) * 0.1).astype("<f2").reshape(-1, 1).view(np.uint8)
    blocks[:, 4:] = rng.integers(0, 256, (len(blocks), 16), dtype=np.uint8)
    return blocks.reshape(-1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_codes_reproduce_the_dequantised_values(kind):
    from qkv.weights.quants import dequantize

    raw = q4_1_blocks(8, 64)
    if kind == "Q4_0":
        raw = raw.reshape(-1, 20)[:, [0, 1, *range(4, 20)]].reshape(-1)
    ref = torch.from_numpy(dequantize(raw, kind).reshape(8, 64))
    codes, scale, zero = int4_codes(raw, kind, (8, 64))
    rebuilt = (codes.float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)
    torch.testing.assert_close(rebuilt, ref, rtol=1e-6, atol=1e-7)
    assert int(codes.max()) <= 15


def test_int4_linear_small_inputs_close_and_large_inputs_exact():
    from qkv.weights.quants import dequantize

    n, k = 96, 128
    raw = q4_1_blocks(n, k, seed=1)
    w = torch.from_numpy(dequantize(raw, "Q4_1").reshape(n, k))
    lin = QuantizedLinear.int4(w, *int4_codes(raw, "Q4_1", (n, k)))
    x = torch.randn(3, k)
    ref = x @ w.T
    small = lin(x)  # int4 kernel: bf16 scales and activations
    assert (small - ref).abs().max() <= 2e-2 * ref.abs().max()
    big = torch.randn(2, 10, k)  # 20 rows > small_m: the exact float32 weights
    torch.testing.assert_close(lin(big), big @ w.T)


def test_half_linear_shares_the_weight():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50, 16))
    lin = QuantizedLinear.half(w)
    assert lin.weight is w
    x = torch.randn(1, 16)
    ref = x @ w.detach().T
    assert (lin(x) - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_parts_are_the_fused_output_split():
    """parts(): one matmul per row block of W on the float path is bitwise the fused matmul's split; small
    inputs keep the compact copy; SwiGLU on a fused QuantizedLinear equals the unfused SwiGLU."""
    from qkv.nn import SwiGLU

    torch.manual_seed(1)
    w, b = torch.randn(48, 16), torch.randn(48)
    lin = QuantizedLinear.half(w, b)
    big, small = torch.randn(2, 12, 16), torch.randn(1, 16)
    for got, want in zip(lin.parts(big, (32, 16)), lin(big).split([32, 16], -1)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(lin.parts(small, (32, 16)), lin(small).split([32, 16], -1)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # float16 copy, as lin(small)
    mlp = SwiGLU(16, 24).eval()
    with torch.no_grad():
        ref = mlp(big)
        mlp.fuse_gate_up(QuantizedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])))
        torch.testing.assert_close(mlp(big), ref)
