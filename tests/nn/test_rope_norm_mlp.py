"""RoPE (R5, A10), RMSNorm and SwiGLU against independent formulas and transformers' rope init."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.errors import ConfigError
from qkv.nn import Llama3Scaling, RMSNorm, RoPE, SwiGLU
from qkv.nn.rope import rope_frequencies

POSITIONS = [0, 1, 255, 256, 257, 1857, 4095, 8191, 65535, 65536]


def exact_tables(dim, theta, positions):
    """cos/sin from Python's math in double precision, pair i with i + dim/2."""
    rows_c, rows_s = [], []
    for p in positions:
        ang = [p * theta ** (-2 * i / dim) for i in range(dim // 2)]
        rows_c.append([math.cos(a) for a in ang] * 2)
        rows_s.append([math.sin(a) for a in ang] * 2)
    return torch.tensor(rows_c, dtype=torch.float64), torch.tensor(rows_s, dtype=torch.float64)


@pytest.mark.parametrize("cast", ["none", "half", "bfloat16"])
def test_rope_tables_within_2e7_of_float64_at_every_listed_position(cast):
    rope = RoPE(64, theta=100000.0)
    module = torch.nn.Sequential(rope)
    if cast != "none":
        getattr(module, cast)()  # casting the model must not touch the tables
    cos, sin = rope.tables(65537, torch.device("cpu"))
    ec, es = exact_tables(64, 100000.0, POSITIONS)
    assert cos.dtype == torch.float32 and rope.inv_freq64.dtype == torch.float64
    assert (cos[POSITIONS].double() - ec).abs().max() < 2e-7
    assert (sin[POSITIONS].double() - es).abs().max() < 2e-7


def test_rope_under_autocast_and_in_bf16_rotates_like_fp32():
    rope = RoPE(16)
    x = torch.randn(1, 2, 5, 16)
    pos = torch.tensor([0, 1, 255, 8191, 65536])
    ref = rope(x, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = rope(x, pos)
    torch.testing.assert_close(auto, ref)
    low = rope(x.bfloat16(), pos)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=1e-2, atol=1e-2)


def test_rope_rotation_matches_complex_multiplication_and_keeps_norms():
    rope = RoPE(8, theta=10000.0)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    pos = torch.arange(6)
    out = rope(x.float(), pos).double()
    z = torch.complex(x[..., :4], x[..., 4:])  # pair (i, i + D/2) as one complex number
    ang = pos[:, None].double() * rope.inv_freq64[None, :]
    rz = z * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(out, torch.cat([rz.real, rz.imag], -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_rope_relative_property_q_dot_k_depends_only_on_offset():
    rope = RoPE(32)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    dots = [(rope(q, torch.tensor([p + 3])) * rope(k, torch.tensor([p]))).sum() for p in (0, 10, 1000)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=1e-4, atol=1e-4)


def test_rope_batched_positions_equal_per_row_positions():
    rope = RoPE(16)
    x = torch.randn(2, 2, 4, 16)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = rope(x, pos)
    torch.testing.assert_close(out[1:], rope(x[1:], pos[1]))


def test_llama3_scaling_equals_transformers_rope_init():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = Llama3Scaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_frequencies(64, 500000.0, scaling)
    torch.testing.assert_close(ours.float(), inv_ref.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_frequencies(64, 500000.0))  # scaling changed something


@pytest.mark.parametrize("bad", [dict(dim=7, theta=1e4), dict(dim=8, theta=float("nan")), dict(dim=0, theta=1e4)])
def test_rope_config_errors(bad):
    with pytest.raises(ConfigError):
        rope_frequencies(bad["dim"], bad["theta"])
    with pytest.raises(ConfigError):
        Llama3Scaling(factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)


def test_rmsnorm_matches_formula_and_casts_like_llama():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6, dtype=torch.float64)
    ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0, dtype=torch.float64)
    torch.testing.assert_close(norm(x.float()).double(), ref, rtol=1e-5, atol=1e-6)
    assert norm.bfloat16()(x.bfloat16()).dtype == torch.bfloat16


def test_swiglu_matches_formula():
    mlp = SwiGLU(4, 10)
    x = torch.randn(2, 3, 4)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    ref = (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref)


def test_rope_tables_do_not_grow_when_the_device_is_a_string():
    """rotation(positions, "cpu") step after step: the cached tables are reused, not rebuilt at twice the size
    (a string never equals a torch.device, which once made each call double them until memory ran out)."""
    rope = RoPE(64, theta=10000.0)
    for p in range(10):  # (doubling from 256 rows, ten calls would have made 262,144)
        cos, _ = rope.rotation(torch.tensor([p]), "cpu")
    assert rope._cos.shape[0] == 256 and torch.equal(cos, rope.rotation(torch.tensor([9]), torch.device("cpu"))[0])
