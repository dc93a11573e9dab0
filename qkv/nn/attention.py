"""The one attention core: ``softmax(q kᵀ · scale + mask) v``, three ways that agree.

Legend: B batch, H query heads, K key/value heads (K divides H; K = H is multi-head, 1 < K < H is
grouped-query, K = 1 is multi-query), G = H / K query heads per kv head, T queries, S keys, D head dim.

Paths (``impl=``):

* ``"reference"`` — every step explicit (scores, scale, mask, softmax in fp32, weighted sum); the
  only path that can hand back the full weight matrix.
* ``"sdpa"`` — ``torch.nn.functional.scaled_dot_product_attention``, PyTorch's fused kernels.
* ``"tiled"`` — blockwise online softmax (the FlashAttention algorithm) in plain PyTorch: never
  builds the T x S matrix, keeps O(T·D) running state, and returns the per-row log-sum-exp so that
  :func:`attention_rows` can rebuild exact weight rows for any queries afterwards.
* ``"auto"`` — ``sdpa``; ``reference`` when weights are asked for; ``tiled`` when the log-sum-exp is.

Whatever the path, a query row with no visible key gives exactly 0 output and finite gradients.

Non-finite values at masked positions: the reference and tiled paths ignore NaN/Inf in masked *keys*
(the score is replaced, not added to); PyTorch's fused kernel does not, and on every path a NaN in a
masked *value* still poisons the row (0 · NaN = NaN in the weighted sum). Keep padding finite — qkv's
models do.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ShapeError
from .masks import check_mask, combine, structural_mask

IMPLS = ("auto", "reference", "sdpa", "tiled")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
    window: int | None = None, dropout_p: float = 0.0, return_weights: bool = False,
    return_lse: bool = False, impl: str = "auto",
):
    """Scaled dot-product attention over q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv).

    Args:
        mask: bool (True = attend) or additive float, broadcastable to (B, H, T, S).
        causal: hide future keys, aligned bottom-right (query i sees keys <= S - T + i).
        scale: multiplies the scores; default 1/sqrt(D).
        window: sliding window; with ``causal`` a query sees its last ``window`` keys.
        dropout_p: dropout on the attention weights (use only in training).
        return_weights: also return the (B, H, T, S) softmax weights (before dropout).
        return_lse: also return the (B, H, T) log-sum-exp of the scaled, masked scores (fp32).
        impl: "auto" | "reference" | "sdpa" | "tiled" (see the module docstring).

    Returns:
        out (B, H, T, Dv); or a tuple ``(out, weights)``, ``(out, lse)`` or ``(out, weights, lse)``.
    """
    user_scale = scale
    scale = _check(q, k, v, mask, scale, window, dropout_p, impl)
    impl = _choose(impl, return_weights, return_lse)
    if impl == "sdpa":  # the default scale is left to SDPA itself: the very call a user would make
        return _sdpa(q, k, v, mask, causal, None if user_scale is None else scale, window, dropout_p)
    if impl == "tiled":
        if return_weights:
            raise ShapeError("impl='tiled' never builds the weight matrix: use attention_rows() with its lse")
        out, lse = tiled_attention(q, k, v, mask=mask, causal=causal, scale=scale, window=window,
                                   dropout_p=dropout_p)
        return (out, lse) if return_lse else out
    out, weights, lse = _reference(q, k, v, mask, causal, scale, window, dropout_p)
    extras = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (out, *extras) if extras else out


def _check(q, k, v, mask, scale, window, dropout_p, impl) -> float:
    """Validate shapes, dtypes, devices and options; return the scale to use."""
    if impl not in IMPLS:
        raise ShapeError(f"impl={impl!r} is not one of {', '.join(IMPLS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeError(f"{name} must be a 4-d tensor (batch, heads, length, head_dim), got {got}")
    (b, h, t, d), (bk, kh, s, dk), (bv, vh, sv, _) = q.shape, k.shape, v.shape
    if d != dk or (bk, kh, s) != (bv, vh, sv) or b != bk:
        raise ShapeError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit: need "
                         "q (B, H, T, D), k (B, K, S, D), v (B, K, S, Dv)")
    if kh == 0 or h % kh:
        raise ShapeError(f"{h} query heads cannot share {kh} key/value heads: K must divide H")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ShapeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ShapeError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if mask is not None:
        check_mask(mask, (b, h, t, s), q.device)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ShapeError(f"window must be a positive int, got {window!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ShapeError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if not math.isfinite(scale):
        raise ShapeError(f"scale must be finite, got {scale}")
    return float(scale)


def _choose(impl: str, return_weights: bool, return_lse: bool) -> str:
    if impl != "auto":
        if impl == "sdpa" and (return_weights or return_lse):
            raise ShapeError("impl='sdpa' cannot return weights or lse: use impl='reference' or 'tiled'")
        return impl
    if return_weights:
        return "reference"
    return "tiled" if return_lse else "sdpa"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32 and lower precision, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, H, S, D): kv head j serves query heads j*G .. j*G+G-1."""
    g = h // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _full_mask(mask, causal, window, t, s, device):
    return combine(mask, structural_mask(t, s, causal=causal, window=window, device=device))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None):
    """Softmax over the last dim in fp32 that gives exact zeros (and finite grads) on fully masked rows.

    Returns (weights fp32, lse fp32) where lse is -inf on fully masked rows.
    """
    s = scores.to(_acc(scores.dtype))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # shift only; keeps -inf rows at 0
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    weights = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (torch.log(denom) + m).squeeze(-1)  # log(0) = -inf for a fully masked row
    return weights, lse


def _reference(q, k, v, mask, causal, scale, window, dropout_p):
    """Every step of the course formula, for reading and for weights."""
    b, h, t, _ = q.shape
    s = k.shape[2]
    k, v = _expand_kv(k, h), _expand_kv(v, h)  # (B, H, S, D)
    acc = _acc(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # (B, H, T, S)
    full = _full_mask(mask, causal, window, t, s, q.device)
    weights, lse = masked_softmax(scores, full)  # (B, H, T, S), (B, H, T)
    used = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(used, v.to(acc))  # (B, H, T, Dv)
    return out.to(q.dtype), weights.to(q.dtype), lse


def _sdpa(q, k, v, mask, causal, scale, window, dropout_p):
    """PyTorch's fused attention. Its is_causal is top-left aligned, so T != S gets an explicit mask."""
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and t == 1 and window is None:
        causal = False  # one query aligned bottom-right sees every key: a decode step needs no mask
    if mask is None and window is None and (not causal or t == s):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and t > 1,
                                              scale=scale, enable_gqa=gqa)
    if causal and mask is None and window is None and t < s and dropout_p == 0.0 and q.device.type == "cpu" \
            and not q.requires_grad:
        return _chunk_after_cache(q, k, v, scale)
    full = _full_mask(mask, causal, window, t, s, q.device)
    if full.dtype != torch.bool:
        full = full.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=gqa)


def _chunk_after_cache(q, k, v, scale):
    """Causal attention of T new queries over S > T keys whose first S - T are cached (a prompt prefilled in
    chunks): the cached keys all visible, the chunk's own causal — two fused calls, each without a mask,
    merged through their log-sum-exps. The same softmax to float rounding as one masked call, which cannot
    skip the hidden half of the chunk's square and is ~1.4x slower at 2,048 queries over 8k keys."""
    t, s = q.shape[2], k.shape[2]
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])  # the CPU flash kernel takes equal head counts
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o1, l1 = flash(q, k[:, :, :s - t], v[:, :, :s - t], scale=scale)[:2]  # (B, H, T, D), (B, H, T)
    o2, l2 = flash(q, k[:, :, s - t:], v[:, :, s - t:], is_causal=True, scale=scale)[:2]
    m = torch.maximum(l1, l2)
    w1, w2 = (l1 - m).exp_().unsqueeze(-1), (l2 - m).exp_().unsqueeze(-1)
    return (o1 * w1).add_(o2 * w2).div_(w1 + w2).to(q.dtype)  # the log-sum-exps are float32


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
    causal: bool = False, scale: float | None = None, window: int | None = None, dropout_p: float = 0.0,
    block_q: int = 256, block_k: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax attention in blocks: returns (out (B, H, T, Dv), lse (B, H, T) fp32).

    Peak extra memory is one (B, H, block_q, block_k) score block plus the O(T·D) running state, never
    T x S. Key blocks that a causal/window mask hides entirely from a query block are skipped.
    """
    scale = _check(q, k, v, mask, scale, window, dropout_p, "tiled")
    b, h, t, _ = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h // kh
    mask4 = None if mask is None else _as_4d(mask, t, s)
    q5 = q.reshape(b, kh, g, t, q.shape[-1])  # (B, K, G, T, D): query head = kv head * G + g
    outs, lses = [], []
    for q0 in range(0, t, block_q):
        q1 = min(q0 + block_q, t)
        o, l = _tiled_rows(q5[:, :, :, q0:q1], k, v, mask4, causal, window, scale, dropout_p, (q0, t, s),
                           block_k)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, dim=3).reshape(b, h, t, v.shape[-1])  # (B, H, T, Dv)
    lse = torch.cat(lses, dim=3).reshape(b, h, t)  # (B, H, T)
    return out.to(q.dtype), lse


def _as_4d(mask: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """View a broadcastable mask as (B|1, H|1, T, S) so that blocks can be sliced out of it."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return m.expand(m.shape[0], m.shape[1], t, s)


def _key_range(q0: int, q1: int, t: int, s: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [lo, hi) that queries [q0, q1) can see at all under the causal/window structure."""
    lo, hi = 0, s
    if causal:
        hi = min(s, s - t + q1)  # last query q1-1 sees keys <= s - t + q1 - 1
    if window is not None:
        lo = max(0, s - t + q0 - window + 1)
        if not causal:
            hi = min(s, s - t + q1 - 1 + window)
    return lo, max(lo, hi)


def _tiled_rows(q5, k, v, mask4, causal, window, scale, dropout_p, geom, block_k):
    """One block of queries against all visible key blocks, with the running max/sum of FlashAttention."""
    q0, t, s = geom
    bq = q5.shape[3]
    b, kh, g = q5.shape[:3]
    dt = _acc(q5.dtype)
    qf = q5.to(dt) * scale
    m = torch.full((b, kh, g, bq, 1), float("-inf"), dtype=dt, device=q5.device)  # running max
    l = torch.zeros((b, kh, g, bq, 1), dtype=dt, device=q5.device)  # running sum of exp
    acc = torch.zeros((b, kh, g, bq, v.shape[-1]), dtype=dt, device=q5.device)  # running weighted sum
    grad = torch.is_grad_enabled() and (q5.requires_grad or k.requires_grad or v.requires_grad)
    lo, hi = _key_range(q0, q0 + bq, t, s, causal, window)
    for k0 in range(lo, hi, block_k):
        k1 = min(k0 + block_k, hi)
        kb = k[:, :, None, k0:k1].to(dt)  # (B, K, 1, Sb, D)
        vb = v[:, :, None, k0:k1].to(dt)
        sc = torch.matmul(qf, kb.transpose(-2, -1))  # (B, K, G, Tb, Sb)
        blk = _block_mask(mask4, causal, window, q0, bq, k0, k1, t, s, q5.device, (b, kh, g))
        if blk is not None:
            sc = sc.masked_fill(~blk, float("-inf")) if blk.dtype == torch.bool else sc + blk.to(dt)
        m_new = torch.maximum(m, sc.amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        corr = torch.exp(m - m_safe)  # rescales what was accumulated under the old max
        if grad:
            p = torch.exp(sc - m_safe)  # (B, K, G, Tb, Sb)
        else:  # inference: in place, the score block is the one big allocation
            p = sc.sub_(m_safe).exp_()
        l = l * corr + p.sum(dim=-1, keepdim=True)
        if dropout_p > 0:
            p = F.dropout(p, p=dropout_p)
        pv = torch.matmul(p, vb)  # (B, K, G, Tb, Dv)
        acc = acc * corr + pv if grad else acc.mul_(corr).add_(pv)
        m = m_new
    out = acc / torch.where(l > 0, l, torch.ones_like(l))  # fully masked rows: acc = 0 -> out = 0
    m_fin = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = (torch.log(l) + m_fin).squeeze(-1)  # -inf where no key was visible
    return out, lse


def _block_mask(mask4, causal, window, q0, bq, k0, k1, t, s, device, bkg):
    """The (B, K, G, Tb, Sb)-broadcastable mask of one block, built only for that block (None if open)."""
    blk = None
    if not _block_open(causal, window, q0, bq, k0, k1, t, s):
        blk = structural_mask(t, s, causal=causal, window=window, device=device,
                              q_start=q0, k_start=k0, q_len=bq, k_len=k1 - k0)
    user = None
    if mask4 is not None:
        b, kh, g = bkg
        user = mask4[:, :, q0:q0 + bq, k0:k1]
        user = user.reshape(user.shape[0], kh, g, bq, k1 - k0) if user.shape[1] != 1 else user.unsqueeze(2)
    return combine(user, blk)


def _block_open(causal, window, q0, bq, k0, k1, t, s) -> bool:
    """True when every query of the block sees every key of the block under causal/window."""
    first, last = s - t + q0, s - t + q0 + bq - 1  # absolute positions of the first and last query
    if causal and k1 - 1 > first:
        return False
    if window is not None:
        if k0 <= last - window:
            return False
        if not causal and k1 - 1 >= first + window:
            return False
    return True


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: Sequence[int] | torch.Tensor, *,
    mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention weights (B, H, R, S) of the chosen query rows, from q, k and the row lse.

    ``weights[r, j] = exp(q_r · k_j · scale + mask_rj - lse_r)``: one dot product per key, no second
    softmax, so the rows equal what the fast path used. Cost O(R·S·D); memory O(R·S).
    """
    sc, idx = _row_scores(q, k, rows, mask, causal, scale, window)
    lr = lse[:, :, idx].to(sc.dtype).unsqueeze(-1)  # (B, H, R, 1)
    lr = torch.where(torch.isfinite(lr), lr, torch.full_like(lr, float("inf")))  # masked row -> 0
    return torch.exp(sc - lr)


def weight_rows(
    q: torch.Tensor, k: torch.Tensor, rows: Sequence[int] | torch.Tensor | None = None, *,
    mask: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Exact softmax weights (B, H, R, S) of the chosen query rows (None = all), without running attention.

    The same numbers as ``attention(..., return_weights=True)`` restricted to those rows, in O(R·S)
    memory: what qkv.explain records while a model computes its outputs on the fast path.
    """
    sc, _ = _row_scores(q, k, rows, mask, causal, scale, window)
    return masked_softmax(sc, None)[0]


def _row_scores(q, k, rows, mask, causal, scale, window):
    """Scaled, masked scores (B, H, R, S) in the accumulation dtype, and the row indices used."""
    b, h, t, d = q.shape
    s = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    idx = torch.arange(t, device=q.device) if rows is None else \
        torch.as_tensor(rows, dtype=torch.long, device=q.device).reshape(-1)
    if idx.numel() and (int(idx.min()) < -t or int(idx.max()) >= t):
        raise ShapeError(f"query rows {idx.tolist()} out of range for T = {t}")
    idx = idx % t
    if mask is not None:
        check_mask(mask, (b, h, t, s), q.device)
    dt = _acc(q.dtype)
    qr = q[:, :, idx].to(dt)  # (B, H, R, D)
    kv, r = k.shape[1], idx.numel()
    # grouped heads: each kv head's G query heads stacked as rows of one matmul — the same dot products
    # without copying the keys G times (a served click at 8k tokens spent most of its time in that copy)
    sc = torch.matmul(qr.reshape(b, kv, (h // kv) * r, d), k.to(dt).transpose(-2, -1)).view(b, h, r, s) * scale
    lo, hi = (int(idx.min()), int(idx.max()) + 1) if idx.numel() else (0, 0)
    full = structural_mask(t, s, causal=causal, window=window, device=q.device, q_start=lo, q_len=hi - lo)
    full = None if full is None else full[idx - lo]  # only the rows' span: a click's row never builds T x S
    if mask is not None:
        user = mask.expand(*mask.shape[:-2], t, s)[..., idx, :]
        full = combine(user, full)
    if full is not None:
        sc = sc.masked_fill(~full, float("-inf")) if full.dtype == torch.bool else sc + full.to(dt)
    return sc, idx
