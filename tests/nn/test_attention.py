"""Every attention path against the float64 loop specification (RELIABILITY R1–R4, R10, A1–A9)."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.errors import ShapeError
from qkv.nn.attention import attention, attention_rows, masked_softmax, tiled_attention
from tests.reference.attention_loop import loop_attention, row_loop_attention

PATHS = ["reference", "sdpa", "tiled", "auto"]
R10 = [(1, 1), (1, 3), (2, 1), (7, 513), (113, 203), (127, 256), (511, 1), (1023, 1024)]
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def make(b, h, kh, t, s, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kh, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kh, s, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding(b, t, s, seed=0, allow_empty=True):
    """A random key-padding mask (B, 1, 1, S), with one batch row having no valid key at all."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    if allow_empty and b > 1:
        lengths[-1] = 0
    return (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]


def run(path, q, k, v, **kw):
    if path == "tiled":
        # small blocks so that several query and key blocks (and their edges) are exercised
        return tiled_attention(q, k, v, block_q=64, block_k=48, **kw)[0]
    return attention(q, k, v, impl=path, **kw)


@pytest.mark.parametrize("t,s", R10)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("causal", [False, True])
def test_paths_match_float64_loop_r10(t, s, heads, causal):
    h, kh = HEADS[heads]
    b = 2 if t * s < 50_000 else 1
    q, k, v = make(b, h, kh, t, s, 16, seed=t * 7 + s)
    mask = padding(b, t, s, seed=t + s) if b > 1 else None
    ref, _ = row_loop_attention(q, k, v, mask=mask, causal=causal)
    for path in PATHS:
        out = run(path, q, k, v, mask=mask, causal=causal)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("d", [16, 64, 128])
def test_head_dims_and_window(d):
    q, k, v = make(1, 2, 1, 33, 40, d, seed=d)
    for causal in (False, True):
        ref, _ = row_loop_attention(q, k, v, causal=causal, window=5)
        for path in PATHS:
            out = run(path, q, k, v, causal=causal, window=5)
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_row_loop_reference_equals_scalar_loop():
    """The vectorised-over-keys reference itself agrees with the fully scalar loop."""
    q, k, v = make(2, 2, 1, 5, 7, 4, seed=3)
    float_mask = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    for kw in ({}, {"causal": True}, {"mask": padding(2, 5, 7)}, {"mask": float_mask}, {"window": 2, "causal": True}):
        a, wa = loop_attention(q, k, v, **kw)
        b, wb = row_loop_attention(q, k, v, **kw)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(wa, wb)


def test_weights_and_lse_match_loop():
    q, k, v = make(2, 4, 2, 9, 12, 8, seed=5)
    mask = padding(2, 9, 12)
    ref_out, ref_w = loop_attention(q, k, v, mask=mask, causal=True)
    out, w, lse = attention(q, k, v, mask=mask, causal=True, return_weights=True, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-4, atol=1e-6)
    _, tiled_lse = tiled_attention(q, k, v, mask=mask, causal=True, block_q=4, block_k=5)
    finite = torch.isfinite(lse)
    assert torch.equal(finite, torch.isfinite(tiled_lse))
    torch.testing.assert_close(tiled_lse[finite], lse[finite], rtol=1e-5, atol=1e-5)


def test_attention_rows_rebuild_exact_weights_from_tiled_lse():
    q, k, v = make(2, 4, 2, 50, 70, 16, seed=6)
    mask = padding(2, 50, 70)
    _, ref_w = row_loop_attention(q, k, v, mask=mask, causal=True)
    _, lse = tiled_attention(q, k, v, mask=mask, causal=True, block_q=16, block_k=16)
    rows = [0, 7, 49, -1]
    w = attention_rows(q, k, lse, rows, mask=mask, causal=True)
    torch.testing.assert_close(w.double(), ref_w[:, :, [0, 7, 49, 49]], rtol=1e-5, atol=1e-6)
    sums = w.sum(-1)
    valid = sums > 0
    torch.testing.assert_close(sums[valid], torch.ones_like(sums[valid]), atol=1e-6, rtol=0)
    assert torch.all(sums[~valid] == 0)  # the fully padded batch row


def test_attention_rows_rejects_out_of_range_rows():
    q, k, _ = make(1, 1, 1, 4, 4, 8)
    with pytest.raises(ShapeError, match="out of range"):
        attention_rows(q, k, torch.zeros(1, 1, 4), [4])


@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_rows_give_zero_and_finite_grads(path):
    """A1/A2: a query with no visible key outputs exactly 0; other rows are unchanged; grads finite."""
    q, k, v = make(2, 2, 2, 4, 6, 8, seed=2)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[0, 0, 1] = False  # one row of one batch element
    mask[1] = False  # a whole batch element
    out = run(path, q, k, v, mask=mask)
    assert torch.all(out[0, :, 1] == 0) and torch.all(out[1] == 0)
    ref, _ = row_loop_attention(q.detach(), k.detach(), v.detach(), mask=mask)
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("path", PATHS)
def test_float_additive_mask_with_neg_inf(path):
    q, k, v = make(1, 2, 2, 5, 5, 8, seed=9)
    add = torch.randn(1, 1, 5, 5)
    add[0, 0, 2] = float("-inf")
    ref, _ = row_loop_attention(q, k, v, mask=add)
    out = run(path, q, k, v, mask=add)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.all(out[0, :, 2] == 0)


@pytest.mark.parametrize("path", ["reference", "tiled"])
def test_nan_in_masked_keys_does_not_leak(path):
    """A3: NaN/Inf in keys at masked positions leave the output unchanged on our own paths.

    PyTorch's fused SDPA kernel lets them through (documented in qkv.nn.attention); models never feed
    non-finite padding, and the policy there is to keep padding finite before attention.
    """
    q, k, v = make(1, 2, 2, 3, 6, 8, seed=4)
    mask = torch.tensor([True] * 4 + [False] * 2).view(1, 1, 1, 6)
    clean = run(path, q, k, v, mask=mask)
    k_bad = k.clone()
    k_bad[:, :, 4] = float("nan")
    k_bad[:, :, 5] = float("inf")
    torch.testing.assert_close(run(path, q, k_bad, v, mask=mask), clean)


def test_softmax_shift_invariance():
    """A9: adding c to every score of a row leaves the probabilities unchanged within 1e-6 (fp32).

    Scores are multiples of 1/8 so that s + c is exact in fp32 and only the softmax itself is tested.
    """
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(-40, 40, (3, 16), generator=g).float() / 8
    w, _ = masked_softmax(scores, None)
    for c in (1e3, 1e4):
        wc, _ = masked_softmax(scores + c, None)
        torch.testing.assert_close(wc, w, rtol=0, atol=1e-6)


def test_causal_is_bottom_right_aligned():
    """A5/A6: with T < S the last query sees every key (a decode step), query i sees keys <= S-T+i."""
    q, k, v = make(1, 1, 1, 3, 8, 4)
    _, w = attention(q, k, v, causal=True, return_weights=True)
    visible = w[0, 0] > 0
    expected = torch.arange(8)[None, :] <= (torch.arange(3)[:, None] + 5)
    assert torch.equal(visible, expected)


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("path", PATHS)
def test_reduced_precision_r1_r3(dtype, rtol, path):
    """R1: error ≤ 2× the same-dtype naive error + 2× rounding noise; R3: absolute bounds."""
    q, k, v = make(2, 4, 2, 65, 97, 64, dtype=torch.float64, seed=11)
    ref, _ = row_loop_attention(q, k, v, causal=True)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    out = run(path, ql, kl, vl, causal=True).double()
    naive = _naive_low_precision(ql, kl, vl).double()
    naive_err = (naive - ref).abs().max().item()
    noise = ((ref.to(dtype) + 0.3 - 0.3).double() - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    print(f"{path} {dtype}: max err {err:.2e}, naive {naive_err:.2e}, noise {noise:.2e}")
    assert err <= 2 * naive_err + 2 * noise
    torch.testing.assert_close(out, ref, rtol=rtol * (3 if path in ("sdpa", "auto") else 1), atol=rtol)


def _naive_low_precision(q, k, v):
    """The course formula with every op in the low-precision dtype (the calibration baseline)."""
    kh, h = k.shape[1], q.shape[1]
    k, v = k.repeat_interleave(h // kh, 1), v.repeat_interleave(h // kh, 1)
    t, s = q.shape[2], k.shape[2]
    sc = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    sc = sc.masked_fill(~(torch.arange(s)[None, :] <= torch.arange(t)[:, None] + s - t), float("-inf"))
    return torch.softmax(sc, dim=-1) @ v


@pytest.mark.parametrize("path", PATHS)
def test_fp16_scores_near_dtype_max_stay_finite(path):
    """A7: q·k/√d ≈ 7e5 would overflow fp16; scores and softmax run in fp32."""
    q, k, v = make(1, 1, 1, 4, 6, 16, seed=13)
    q = q * 300
    k = k * 300
    ref, _ = row_loop_attention(q, k, v)
    out = run(path, q.half(), k.half(), v.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("bad,match", [
    (lambda q: torch.ones(1, 1, 3, 5, dtype=torch.int64), "dtype"),
    (lambda q: torch.ones(1, 1, 4, 5, dtype=torch.bool), "does not broadcast"),
    (lambda q: torch.ones(2, 1, 1, 1, 3, 5, dtype=torch.bool), "does not broadcast"),
    (lambda q: [[True]], "torch.Tensor"),
])
def test_bad_masks_raise_clear_errors(bad, match):
    """A4: int mask, wrongly shaped mask — a ShapeError that names the shapes."""
    q, k, v = make(1, 2, 2, 3, 5, 4)
    with pytest.raises(ShapeError, match=match):
        attention(q, k, v, mask=bad(q))


def test_bad_arguments_raise_clear_errors():
    q, k, v = make(1, 4, 3, 3, 5, 4)
    with pytest.raises(ShapeError, match="K must divide H"):
        attention(q, k, v)
    q, k, v = make(1, 2, 2, 3, 5, 4)
    with pytest.raises(ShapeError, match="4-d"):
        attention(q[0], k, v)
    with pytest.raises(ShapeError, match="dtype"):
        attention(q.double(), k, v)
    with pytest.raises(ShapeError, match="impl"):
        attention(q, k, v, impl="flash9000")
    with pytest.raises(ShapeError, match="cannot return weights"):
        attention(q, k, v, impl="sdpa", return_weights=True)
    with pytest.raises(ShapeError, match="window"):
        attention(q, k, v, window=0)


def test_auto_picks_paths_without_changing_results():
    q, k, v = make(1, 4, 2, 20, 20, 8)
    plain = attention(q, k, v, causal=True)
    with_w, _ = attention(q, k, v, causal=True, return_weights=True)
    with_lse, _ = attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(with_w, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_lse, plain, rtol=1e-5, atol=1e-6)


def test_deterministic_reference_path_bitwise():
    """R9: the reference path is bitwise repeatable (outputs and grads)."""
    q, k, v = make(1, 2, 1, 16, 16, 8)
    results = []
    for _ in range(20):
        qq = q.clone().requires_grad_()
        out = attention(qq, k, v, causal=True, impl="reference")
        out.sum().backward()
        results.append((out.detach(), qq.grad))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_gradcheck_reference_and_tiled():
    """R2: gradients of our paths vs finite differences in float64."""
    q, k, v = make(1, 2, 1, 3, 4, 4, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, mask=mask, impl="reference"),
                                    (q, k, v), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda a, b, c: tiled_attention(a, b, c, mask=mask, block_q=2, block_k=2)[0],
                                    (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("t,s,heads", [(5, 12, (6, 2)), (64, 200, (9, 3)), (7, 8, (4, 4))])
def test_a_chunk_after_its_cache_matches_the_float64_softmax(t, s, heads):
    """T new queries over S > T keys, causal aligned bottom-right (a prompt prefilled in chunks): the two-call
    log-sum-exp merge equals a float64 loop over the masked softmax."""
    from qkv.nn.attention import attention

    g = torch.Generator().manual_seed(t * s)
    h, kh = heads
    q, k, v = (torch.randn(2, n, m, 16, generator=g) for n, m in ((h, t), (kh, s), (kh, s)))
    got = attention(q, k, v, causal=True)
    kk, vv = k.double().repeat_interleave(h // kh, 1), v.double().repeat_interleave(h // kh, 1)
    scores = q.double() @ kk.transpose(-1, -2) / 4.0  # (B, H, T, S)
    visible = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    ref = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)  # a bfloat16 model's chunked prefill
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), ref, rtol=0, atol=0.05)
