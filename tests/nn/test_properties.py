"""Property tests (hypothesis) of the attention core and MultiHeadAttention."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.nn import KVCache, MultiHeadAttention, RoPE
from qkv.nn.attention import attention

IMPL = st.sampled_from(["reference", "sdpa", "tiled"])
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw):
    kh = draw(st.integers(1, 3))
    h = kh * draw(st.integers(1, 3))
    b, t, s, d = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.sampled_from([2, 4, 8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kh, s, d, generator=g)
    v = torch.randn(b, kh, s, d, generator=g)
    mask = torch.rand(b, 1, t, s, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7]))
    return q, k, v, mask


@SETTINGS
@given(problems(), st.booleans())
def test_rows_sum_to_one_or_zero_when_fully_masked(p, causal):
    q, k, v, mask = p
    _, w = attention(q, k, v, mask=mask, causal=causal, return_weights=True)
    sums = w.sum(-1)
    visible = (w > 0).any(-1)
    torch.testing.assert_close(sums[visible], torch.ones_like(sums[visible]), atol=1e-6, rtol=0)
    assert torch.all(sums[~visible] == 0)


@SETTINGS
@given(problems(), IMPL, st.data())
def test_unmasked_self_attention_is_permutation_equivariant(p, impl, data):
    q, k, v, _ = p
    t = min(q.shape[2], k.shape[2])
    q, k, v = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    perm = torch.tensor(data.draw(st.permutations(list(range(t)))))
    out = attention(q, k, v, impl=impl)
    out_p = attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], impl=impl)
    torch.testing.assert_close(out_p, out[:, :, perm], rtol=1e-5, atol=1e-5)


@SETTINGS
@given(problems(), IMPL, st.integers(0, 8))
def test_causal_outputs_do_not_depend_on_future_tokens(p, impl, cut):
    q, k, v, _ = p
    t = min(q.shape[2], k.shape[2])
    q, k, v = q[:, :, :t], k[:, :, :t], v[:, :, :t]
    cut = min(cut, t - 1)
    out = attention(q, k, v, causal=True, impl=impl)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] = torch.randn_like(k2[:, :, cut + 1:]) * 10
    v2[:, :, cut + 1:] = torch.randn_like(v2[:, :, cut + 1:]) * 10
    out2 = attention(q, k2, v2, causal=True, impl=impl)
    torch.testing.assert_close(out2[:, :, :cut + 1], out[:, :, :cut + 1], rtol=1e-5, atol=1e-6)


@SETTINGS
@given(problems(), IMPL, st.booleans())
def test_gqa_equals_mha_with_repeated_kv(p, impl, causal):
    q, k, v, mask = p
    g = q.shape[1] // k.shape[1]
    out = attention(q, k, v, mask=mask, causal=causal, impl=impl)
    rep = attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), mask=mask, causal=causal, impl=impl)
    torch.testing.assert_close(out, rep, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 10), st.lists(st.integers(1, 4), min_size=1, max_size=5),
       st.integers(0, 1000))
def test_step_by_step_decode_with_cache_equals_full_causal_forward(kv_div, t0, steps, seed):
    torch.manual_seed(seed)
    n_kv = [6, 3, 2][kv_div - 1]
    m = MultiHeadAttention(24, 6, n_kv, rope=RoPE(4)).eval()
    total = t0 + sum(steps)
    x = torch.randn(1, total, 24)
    full = m(x, causal=True)
    cache = KVCache(1, n_kv, total, 4)
    parts, start = [], 0
    for n in [t0, *steps]:
        parts.append(m(x[:, start:start + n], causal=True, cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(problems(), IMPL)
def test_fully_masked_rows_zero_output_finite_grads(p, impl):
    q, k, v, mask = p
    mask = mask.clone()
    mask[..., 0, :] = False  # first query of every batch element sees nothing
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, mask=mask, impl=impl)
    assert torch.all(out[:, :, 0] == 0)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
