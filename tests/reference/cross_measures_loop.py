"""ALTI through an encoder–decoder (ALTI+, Ferrando et al. 2022) as slow float64 loops — the spec of the
cross-attention mixing in qkv.explain, written from the formulas with the model's parameters and PyTorch's
own LayerNorm / Linear modules only (nothing of qkv's measures, observers or attention code).

The forward is recomputed here, teacher-forced on the decoder inputs [<bos>] + output[:-1], head by head and
key by key; :func:`cross_alti` returns its logits too, so a test can check that this forward is the model's
before it trusts the measures read off it.
"""

from __future__ import annotations

import copy
import math

import torch

F64 = torch.float64


def _attend(attn, xq, xkv, n_heads: int, causal: bool):
    """Weights (H, T, S) and each head's output vector per key f (H, S, C), by loops; the sublayer's output."""
    assert attn.qkv_proj is None, "the reference reads the separate q, k, v projections"
    q, k, v = attn.q_proj(xq), attn.k_proj(xkv), attn.v_proj(xkv)
    t, s, c = len(xq), len(xkv), attn.o_proj.weight.shape[0]
    d = q.shape[1] // n_heads
    wo = attn.o_proj.weight
    alpha = torch.zeros(n_heads, t, s, dtype=F64)
    f = torch.zeros(n_heads, s, c, dtype=F64)
    for h in range(n_heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(t):
            seen = range(i + 1) if causal else range(s)
            scores = [float(q[i, sl] @ k[j, sl]) / math.sqrt(d) for j in seen]
            top = max(scores)
            e = [math.exp(x - top) for x in scores]
            for j, ej in zip(seen, e):
                alpha[h, i, j] = ej / sum(e)
        for j in range(s):
            f[h, j] = wo[:, sl] @ v[j, sl]
    out = torch.einsum("hts,hsc->tc", alpha, f)
    if attn.o_proj.bias is not None:
        out = out + attn.o_proj.bias
    return alpha, f, out


def _alti(y, tvecs) -> torch.Tensor:
    """max(0, ‖y‖₁ − ‖y − t_j‖₁) over j, as shares."""
    raw = torch.tensor([max(0.0, float(y.abs().sum() - (y - t).abs().sum())) for t in tvecs], dtype=F64)
    return raw / raw.sum() if raw.sum() > 0 else raw


def _sublayer(block, attn, x, context, n_heads: int, causal: bool):
    """One attention sublayer with its residual and norm: output y (T, C), ALTI rows (T, N) (N = S for
    self-attention; S + 1 for cross-attention, the residual last), and the worst relative error of
    Σ T(x_j) + b against y."""
    norm, pre = block.norm, block.norm_first
    h = norm(x) if pre else x
    kv = h if context is None else context
    alpha, f, out = _attend(attn, h, kv, n_heads, causal)
    z = x + out
    y = z if pre else norm(z)
    b_o = attn.o_proj.bias if attn.o_proj.bias is not None else torch.zeros(x.shape[1], dtype=F64)
    rows, worst = [], 0.0
    for i in range(len(x)):
        t = torch.einsum("hs,hsc->sc", alpha[:, i], f).clone()  # (S, C)
        if context is None:
            t[i] += x[i]
        else:
            t = torch.cat([t, x[i][None]])
        b = b_o
        if not pre:  # LayerNorm with its scale fixed at z_i: linear
            sigma = torch.sqrt(z[i].var(unbiased=False) + norm.eps)
            t = norm.weight * (t - t.mean(-1, keepdim=True)) / sigma
            b = norm.weight * (b_o - b_o.mean()) / sigma + norm.bias
        worst = max(worst, float((t.sum(0) + b - y[i]).norm() / y[i].norm()))
        rows.append(_alti(y[i], t))
    width = max(len(r) for r in rows)
    return y, torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=F64)]) for r in rows]), worst


def _feed_forward(block, ff, y):
    return y + ff(block.norm(y)) if block.norm_first else block.norm(y + ff(y))


@torch.no_grad()
def cross_alti(model, src: list[int], tgt: list[int]) -> dict:
    """For an EncoderDecoder (qkv.models.encoder_decoder), source ids and decoder inputs: per decoder layer the
    cross-attention's ALTI rows (L, Q, S + 1), the final states' composition over source tokens (Q, S) and the
    target inputs' total share (Q,), the encoder's composed map (S, S), the worst sum error, and the logits."""
    m = copy.deepcopy(model).double().eval()
    cfg = m.config
    n_h, d = cfg.n_heads, cfg.d_model
    s, q = len(src), len(tgt)
    x = m.src_embed.weight[torch.tensor(src)] * math.sqrt(d) + m.positions[:s]
    enc = torch.eye(s, dtype=F64)
    worst = 0.0
    for layer in m.encoder:
        y, c, err = _sublayer(layer.block1, layer.self_attn, x, None, n_h, causal=False)
        enc, worst = c @ enc, max(worst, err)
        x = _feed_forward(layer.block2, layer.ff, y)
    memory = m.encoder_norm(x)
    x = m.tgt_embed.weight[torch.tensor(tgt)] * math.sqrt(d) + m.positions[:q]
    comp = torch.cat([torch.zeros(q, s, dtype=F64), torch.eye(q, dtype=F64)], 1)  # (Q, S + Q)
    source = torch.cat([enc, torch.zeros(s, q, dtype=F64)], 1)
    cross = []
    for layer in m.decoder:
        y, c_self, err1 = _sublayer(layer.block1, layer.self_attn, x, None, n_h, causal=True)
        after_self = c_self @ comp
        y, c_cross, err2 = _sublayer(layer.block2, layer.cross_attn, y, memory, n_h, causal=False)
        comp = c_cross[:, :s] @ source + c_cross[:, s:] * after_self
        cross.append(c_cross)
        worst = max(worst, err1, err2)
        x = _feed_forward(layer.block3, layer.ff, y)
    logits = m.out(m.decoder_norm(x))
    return {"cross": torch.stack(cross), "model_source": comp[:, :s], "target_share": comp[:, s:].sum(-1),
            "encoder": enc, "sum_error": worst, "logits": logits}
