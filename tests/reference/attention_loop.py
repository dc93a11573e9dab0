"""The specification of attention as loops in float64 — slow on purpose, nothing vectorised across rows.

For every batch b, query head h and query i: score each key, apply scale and mask, softmax with the
max subtracted, and take the weighted sum of values. A query with no visible key gives zeros.
"""

from __future__ import annotations

import math

import torch


def _visible(i: int, j: int, t: int, s: int, causal: bool, window: int | None) -> bool:
    pos = s - t + i  # bottom-right alignment: query i sits at absolute key position s - t + i
    if causal and j > pos:
        return False
    if window is not None:
        if causal and j <= pos - window:
            return False
        if not causal and abs(pos - j) >= window:
            return False
    return True


def loop_attention(q, k, v, *, mask=None, causal=False, scale=None, window=None):
    """Return (out, weights) in float64: out (B, H, T, Dv), weights (B, H, T, S)."""
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    b_, h_, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h_ // kh
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    full_mask = None if mask is None else mask.expand(b_, h_, t, s)
    out = torch.zeros(b_, h_, t, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(b_, h_, t, s, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kv = h // g  # the kv head this query head shares
            for i in range(t):
                row = []
                for j in range(s):
                    sc = float(q[b, h, i] @ k[b, kv, j]) * scale
                    if not _visible(i, j, t, s, causal, window):
                        sc = -math.inf
                    elif full_mask is not None:
                        m = full_mask[b, h, i, j]
                        if m.dtype == torch.bool:
                            sc = sc if bool(m) else -math.inf
                        else:
                            sc = sc + float(m)
                    row.append(sc)
                top = max(row)
                if top == -math.inf:
                    continue  # nothing visible: weights and output stay 0
                ex = [math.exp(x - top) for x in row]
                tot = sum(ex)
                for j in range(s):
                    weights[b, h, i, j] = ex[j] / tot
                out[b, h, i] = weights[b, h, i] @ v[b, kv]
    return out, weights


def row_loop_attention(q, k, v, *, mask=None, causal=False, scale=None, window=None):
    """Same spec, looping over (b, h, i) but vectorised over keys — for the larger R10 shapes."""
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    b_, h_, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = h_ // kh
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    j = torch.arange(s)
    full_mask = None if mask is None else mask.expand(b_, h_, t, s)
    out = torch.zeros(b_, h_, t, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(b_, h_, t, s, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kv = h // g
            for i in range(t):
                sc = (k[b, kv] @ q[b, h, i]) * scale  # (S,)
                pos = s - t + i
                vis = torch.ones(s, dtype=torch.bool)
                if causal:
                    vis &= j <= pos
                if window is not None:
                    vis &= (j > pos - window) if causal else ((pos - j).abs() < window)
                if full_mask is not None:
                    m = full_mask[b, h, i]
                    if m.dtype == torch.bool:
                        vis &= m
                    else:
                        sc = sc + m.double()
                sc = sc.masked_fill(~vis, -math.inf)
                if not torch.isfinite(sc.max()):
                    continue
                ex = torch.exp(sc - sc.max())
                weights[b, h, i] = ex / ex.sum()
                out[b, h, i] = weights[b, h, i] @ v[b, kv]
    return out, weights
