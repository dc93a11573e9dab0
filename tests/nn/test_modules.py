"""The course's classes against PyTorch's own nn.MultiheadAttention and the float64 loop spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.errors import ShapeError
from qkv.nn import CrossAttention, KVCache, MaskedSelfAttention, MultiHeadAttention, RoPE, SelfAttention
from tests.reference.attention_loop import loop_attention


def copy_into_torch_mha(ours: MultiHeadAttention, kdim=None) -> nn.MultiheadAttention:
    c = ours.q_proj.in_features
    ref = nn.MultiheadAttention(c, ours.n_heads, bias=ours.q_proj.bias is not None, batch_first=True,
                                kdim=kdim, vdim=kdim)
    with torch.no_grad():
        if kdim is None:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        else:
            ref.q_proj_weight.copy_(ours.q_proj.weight)
            ref.k_proj_weight.copy_(ours.k_proj.weight)
            ref.v_proj_weight.copy_(ours.v_proj.weight)
        if ours.q_proj.bias is not None:
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
            ref.out_proj.bias.copy_(ours.o_proj.bias)
        ref.out_proj.weight.copy_(ours.o_proj.weight)
    return ref.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["self", "causal", "padded", "cross", "cross_padded"])
def test_multihead_equals_torch_multiheadattention(bias, kind):
    torch.manual_seed(0)
    c, h, t, s = 32, 4, 7, 9
    cross = kind.startswith("cross")
    ours = MultiHeadAttention(c, h, bias=bias, d_context=24 if cross else None).eval()
    ref = copy_into_torch_mha(ours, kdim=24 if cross else None)
    x = torch.randn(3, t, c)
    ctx = torch.randn(3, s, 24) if cross else x
    n_keys = s if cross else t
    kw, rkw = {}, {}
    if kind == "causal":
        kw["causal"] = True
        rkw["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)  # torch: True = NOT allowed
    if kind.endswith("padded"):
        keep = torch.arange(n_keys)[None, :] < torch.tensor([n_keys, 3, 5])[:, None]
        kw["mask"] = keep[:, None, None, :]
        rkw["key_padding_mask"] = ~keep
    out, w = ours(x, ctx if cross else None, return_weights=True, **kw)
    rout, rw = ref(x, ctx, ctx, need_weights=True, average_attn_weights=False, **rkw)
    torch.testing.assert_close(out, rout, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w, rw, rtol=1e-4, atol=1e-6)


def test_multihead_fast_path_equals_weights_path():
    torch.manual_seed(1)
    m = MultiHeadAttention(48, 6, 2).eval()
    x = torch.randn(2, 11, 48)
    out_fast = m(x, causal=True)
    out_slow, w = m(x, causal=True, return_weights=True)
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-5, atol=1e-6)
    assert w.shape == (2, 6, 11, 11)


def test_single_head_classes_match_loop_spec():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 6)
    head = SelfAttention(6, 3)
    q = head.q_proj(x).unsqueeze(1)
    k = head.k_proj(x).unsqueeze(1)
    v = head.v_proj(x).unsqueeze(1)
    for cls, causal in ((SelfAttention, False), (MaskedSelfAttention, True)):
        m = cls(6, 3)
        m.load_state_dict(head.state_dict())
        z, w = m(x, return_weights=True)
        ref_z, ref_w = loop_attention(q, k, v, causal=causal)
        torch.testing.assert_close(z.double(), ref_z[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.double(), ref_w[:, 0], rtol=1e-4, atol=1e-6)
    z_unbatched = head(x[0])
    torch.testing.assert_close(z_unbatched, head(x)[0])


def test_cross_attention_widths_and_weights():
    torch.manual_seed(3)
    ca = CrossAttention(8, 4, d_context=10, d_v=5)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 7, 10)
    z, w = ca(x, ctx, return_weights=True)
    assert z.shape == (2, 3, 5) and w.shape == (2, 3, 7)
    q, k, v = ca.q_proj(x)[:, None], ca.k_proj(ctx)[:, None], ca.v_proj(ctx)[:, None]
    ref_z, _ = loop_attention(q, k, v)
    torch.testing.assert_close(z.double(), ref_z[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_kv", [6, 2, 1])
def test_kv_cache_decode_equals_full_forward(n_kv):
    """R6/A5/A6: chunked prefill then one-token steps with the cache equal the full causal forward."""
    torch.manual_seed(4)
    m = MultiHeadAttention(48, 6, n_kv, rope=RoPE(8, theta=500.0)).eval()
    x = torch.randn(2, 12, 48)
    full = m(x, causal=True)
    cache = KVCache(2, n_kv, 16, 8)
    parts = [m(x[:, :5], causal=True, cache=cache), m(x[:, 5:8], causal=True, cache=cache)]
    parts += [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.offset == 12


def test_kv_cache_overflow_is_an_error_not_a_wrap():
    m = MultiHeadAttention(16, 2)
    cache = KVCache(1, 2, 4, 8)
    m(torch.randn(1, 3, 16), causal=True, cache=cache)
    with pytest.raises(ShapeError, match="KV cache full"):
        m(torch.randn(1, 2, 16), causal=True, cache=cache)
    assert cache.offset == 3


def test_cross_attention_cache_is_filled_once_and_reused():
    torch.manual_seed(5)
    m = MultiHeadAttention(16, 2, d_context=12).eval()
    ctx = torch.randn(1, 6, 12)
    x = torch.randn(1, 4, 16)
    cache = KVCache(1, 2, 6, 8, cross=True)
    first = m(x[:, :1], ctx, cache=cache)
    later = m(x[:, 1:], cache=cache)
    torch.testing.assert_close(torch.cat([first, later], 1), m(x, ctx))


def test_module_construction_errors():
    with pytest.raises(ShapeError, match="multiple of n_kv_heads"):
        MultiHeadAttention(16, 4, 3)
    with pytest.raises(ShapeError, match="head_dim"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ShapeError, match="batch, length, features"):
        SelfAttention(6, 3)(torch.randn(6))


def test_fused_projections_compute_the_same_function():
    """fuse_qkv / fuse_gate_up: one stacked matmul gives the outputs of the separate ones."""
    from qkv.nn import SwiGLU

    torch.manual_seed(6)
    m = MultiHeadAttention(48, 6, 2, rope=RoPE(8), bias=True).eval()
    x = torch.randn(2, 5, 48)
    before = m(x, causal=True)
    fused = nn.Linear(48, (6 + 2 * 2) * 8, bias=True)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        fused.bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
    m.fuse_qkv(fused)
    torch.testing.assert_close(m(x, causal=True), before)
    mlp = SwiGLU(48, 64)
    y = mlp(x)
    gu = nn.Linear(48, 128, bias=False)
    with torch.no_grad():
        gu.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    mlp.fuse_gate_up(gu)
    torch.testing.assert_close(mlp(x), y)


@pytest.mark.parametrize("kind", ["causal", "masked", "cached", "cross"])
def test_last_query_is_the_last_row_of_the_full_output(kind):
    """last_query=True computes the full output's last row alone; keys/values still fill the cache."""
    torch.manual_seed(7)
    m = MultiHeadAttention(48, 6, 2, rope=RoPE(8), d_context=40 if kind == "cross" else None).eval()
    x = torch.randn(2, 9, 48)
    kw = {"causal": kind != "cross"}
    if kind == "masked":  # (T, S) mask: its last row goes with the last query
        kw["mask"] = torch.rand(9, 9) > 0.3
        kw["mask"][:, 0] = True
    if kind == "cross":
        kw["context"] = torch.randn(2, 7, 40)
    if kind == "cached":
        full_cache, last_cache = KVCache(2, 2, 12, 8), KVCache(2, 2, 12, 8)
        m(x[:, :3], causal=True, cache=full_cache), m(x[:, :3], causal=True, cache=last_cache)
        full = m(x[:, 3:], cache=full_cache, **kw)
        last = m(x[:, 3:], cache=last_cache, last_query=True, **kw)
        assert last_cache.offset == full_cache.offset == 9
        torch.testing.assert_close(last_cache.k, full_cache.k, rtol=0, atol=0)
        torch.testing.assert_close(last_cache.v, full_cache.v, rtol=0, atol=0)
    else:
        full, last = m(x, **kw), m(x, last_query=True, **kw)
    assert last.shape == (2, 1, 48)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(last, full[:, -2:-1], rtol=1e-3, atol=1e-3)  # the row that matters was kept
    if kind != "cached":
        w = m(x, last_query=True, return_weights=True, **kw)[1]
        torch.testing.assert_close(w, m(x, return_weights=True, **kw)[1][..., -1:, :], rtol=1e-5, atol=1e-6)


def test_glu_in_place_only_when_autograd_is_off():
    """SwiGLU's silu(gate) * up runs in gate's buffer under no_grad (same numbers) and out of place when
    gradients are wanted (autograd still sees the inputs it saved)."""
    from qkv.nn import SwiGLU

    torch.manual_seed(8)
    mlp = SwiGLU(16, 32)
    x = torch.randn(3, 16, requires_grad=True)
    y = mlp(x)
    y.sum().backward()  # would raise if silu had overwritten its saved input
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), y.detach(), rtol=0, atol=0)
    assert x.grad is not None and x.grad.abs().sum() > 0
    seen = []  # a forward hook that keeps gate_proj's output (as activation probes do) sees it untouched
    mlp.gate_proj.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        mlp(x)
    torch.testing.assert_close(seen[0], mlp.gate_proj(x).detach(), rtol=0, atol=0)
