"""The measures of qkv.explain.measures computed layer by layer while the model runs its fast kernels.

Legend: L layers, H heads, Q captured query rows, S keys (= T tokens in one forward), C model dim.

Per-layer measures (weights, norms, logit) need only the captured rows: O(H·Q·S) per layer. Whole-model
maps (mixing, rollout, alti-logit) need each layer's full (S, S) map, which is built in row blocks,
multiplied into one running (S, S) product and dropped: O(S²) at a time, never O(L·H·S²). The logit
measures keep one (S, C) matrix per layer (each key's part of the attention update at the prediction row,
and for alti-logit the same carried back to the input tokens), O(L·S·C).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..nn.attention import weight_rows
from ..nn.observer import AttentionObserver
from ..nn.quant import matrix
from . import measures as M

FULL_BLOCK = 256  # query rows of one layer's full map computed at a time


class MeasureObserver(AttentionObserver):
    """Collects, for the chosen layers, heads and query rows, every requested measure.

    After the forward, per captured layer: ``per_head[name][layer]`` (H_sel, Q, S) for weights and norms,
    ``per_layer[name][layer]`` (Q, S) for norms, mixing and rollout, ``value_norms[layer]`` (H_sel, S);
    :meth:`model_rows` gives the whole-model maps' rows and :meth:`logit` the prediction's contributions."""

    def __init__(self, layers: list[int], heads: list[int], rows: list[int], measures: set[str],
                 logit_row: int | None = None):
        self.layers, self.heads, self.rows = layers, heads, rows
        self.measures = measures
        self.full = bool(measures & {"mixing", "rollout", "alti-logit"})
        self.logit_row = logit_row if measures & {"logit", "alti-logit"} else None
        self.pending: tuple | None = None
        self.per_head: dict[str, dict[int, torch.Tensor]] = {"weights": {}, "norms": {}}
        self.per_layer: dict[str, dict[int, torch.Tensor]] = {m: {} for m in ("norms", "mixing", "rollout")}
        self.value_norms: dict[int, torch.Tensor] = {}
        self.mix_total: torch.Tensor | None = None  # M^l, (S, S)
        self.roll_total: torch.Tensor | None = None  # R^l, (S, S)
        self.logit_direct: list[tuple] = []  # per layer: row n's weights (H, S), values (K, S, D), W_O^h (H, C, D)
        self.logit_carried: list[torch.Tensor] = []  # the same carried back to the input tokens (M^(l−1)ᵀ ·)
        self.x0: torch.Tensor | None = None  # the embedding at the prediction row
        self.unexplained: torch.Tensor | None = None  # Σ_l MLP updates + output biases at the prediction row
        self.final_state: torch.Tensor | None = None

    def __call__(self, q, k, *, v=None, mask=None, causal=False, out_proj=None):
        if v is None or out_proj is None:
            raise InputError("this model's attention does not hand its values to observers; only weights can be "
                             "captured from it")
        self.pending = (q[0], k[0], v[0], mask, causal, out_proj)  # batch of one

    def residual(self, x, z, *, norm=None, out=None):
        q, k, v, mask, causal, out_proj = self.pending
        self.pending = None
        layer, x, z = self.layer, x[0].float(), z[0].float()  # (S, C) each
        n_heads = q.shape[0]
        wo = M.head_projections(matrix(out_proj).float(), n_heads)  # (H, C, D)
        vh = M.expand_heads(v.float(), n_heads)  # (H, S, D)
        if layer in self.layers:
            self._rows(layer, q, k, vh, wo, mask, causal)
        if self.logit_row is not None:  # before this layer's mixing joins the running product
            self._logit_layer(layer, q, k, v.float(), wo, x, z, mask, causal, out, out_proj)
        if self.full:
            self._full(layer, q, k, M.head_vectors(vh, wo), x, z, mask, causal, norm)  # f: (H, S, C)

    # -- the captured rows of one layer ---------------------------------------------------------------

    def _rows(self, layer, q, k, vh, wo, mask, causal):
        alpha = weight_rows(q[None], k[None], self.rows, mask=mask, causal=causal)[0].float()  # (H, Q, S)
        vn = M.value_norms(vh, wo)  # (H, S)
        sel = self.heads
        self.per_head["weights"][layer] = alpha[sel]
        self.value_norms[layer] = vn[sel]  # for the sinks, whatever the measures
        if "norms" in self.measures:
            self.per_head["norms"][layer] = M.shares(alpha[sel] * vn[sel, None, :])  # (H_sel, Q, S)
            self.per_layer["norms"][layer] = M.shares(M.layer_norms(alpha, M.key_grams(vh, wo)))  # (Q, S)

    # -- full maps: mixing, rollout, logit --------------------------------------------------------------

    def _full(self, layer, q, k, f, x, z, mask, causal, norm):
        s = k.shape[1]
        mixing = bool(self.measures & {"mixing", "alti-logit"})  # rollout alone needs no ALTI ...
        rollout = "rollout" in self.measures  # ... and ALTI no rollout
        y = norm(z) if norm is not None else z  # the sublayer's output, as the model computed it
        f_by_key = f.transpose(0, 1).contiguous() if mixing else None  # (S, H, C)
        mix = torch.zeros(s, s, device=x.device) if mixing else None  # C^l: row i = each token's share of y_i
        mean_w = torch.zeros(s, s, device=x.device) if rollout else None  # the heads' mean weights
        for r0 in range(0, s, FULL_BLOCK):
            rows = torch.arange(r0, min(r0 + FULL_BLOCK, s))
            alpha = weight_rows(q[None], k[None], rows, mask=mask, causal=causal)[0].float()  # (H, Rb, S)
            if rollout:
                mean_w[rows] = alpha.mean(0)
            for b0 in range(0, len(rows) if mixing else 0, M.ALTI_BLOCK):
                sub = rows[b0:b0 + M.ALTI_BLOCK]
                hi = int(sub[-1]) + 1 if causal and mask is None else s  # causal rows see no later key
                a = alpha[:, b0:b0 + len(sub), :hi]
                mix[sub, :hi] = M.alti_rows(a, f_by_key[:hi], x[:hi], y, sub, norm=norm, z=z)
        if mixing:
            self.mix_total = mix if self.mix_total is None else mix @ self.mix_total  # M^l = C^l M^(l−1)
        if rollout:
            step = M.rollout_step(mean_w)
            self.roll_total = step if self.roll_total is None else step @ self.roll_total
        if layer in self.layers:
            rows = torch.tensor(self.rows)
            if mixing:
                self.per_layer["mixing"][layer] = mix[rows]
            if rollout:
                self.per_layer["rollout"][layer] = self.roll_total[rows]

    def _logit_layer(self, layer, q, k, v, wo, x, z, mask, causal, out, out_proj):
        """What row n's prediction needs from this layer: its weights (H, S) with the values and the heads'
        output maps (``logit`` splits the update by key once u is known), and for alti-logit the update
        split over keys (S, C) carried back through the mixing map of the layers below."""
        n = self.logit_row
        alpha_n = weight_rows(q[None], k[None], [n], mask=mask, causal=causal)[0, :, 0].float()  # (H, S)
        self.logit_direct.append((alpha_n, v, wo))
        if "alti-logit" in self.measures:
            update = torch.einsum("hs,hsc->sc", alpha_n, M.head_vectors(M.expand_heads(v, wo.shape[0]), wo))
            below = self.mix_total  # M^(l−1): which input tokens make up each position's state entering layer l
            self.logit_carried.append(update if below is None else below.T @ update)  # (S_in, C)
        if layer == 0:
            self.x0 = x[n]
        self.final_state = out[0, n].float()  # after the last layer: what the final norm and unembedding read
        rest = (out[0, n].float() - z[n]) if out is not None else torch.zeros_like(z[n])  # the MLP's update
        if out_proj.bias is not None:
            rest = rest + out_proj.bias.float()
        self.unexplained = rest if self.unexplained is None else self.unexplained + rest

    def logit(self, u: torch.Tensor, carried: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-layer contributions (L, S) by key position (``carried``: by input token), the embedding's own
        term (S,) at the prediction row, and the remainder, for the direction u."""
        if carried:
            per_layer = torch.stack([part @ u for part in self.logit_carried])  # (L, S)
        else:
            per_layer = torch.stack([M.logit_by_key(alpha, v, wo, u) for alpha, v, wo in self.logit_direct])
        direct = torch.zeros(per_layer.shape[1], device=u.device)
        direct[self.logit_row] = float(self.x0 @ u)
        return per_layer, direct, float(self.unexplained @ u)

    def model_rows(self, name: str) -> torch.Tensor:
        total = self.mix_total if name == "mixing" else self.roll_total
        return total[torch.tensor(self.rows)]


class CrossMixing(AttentionObserver):
    """ALTI through an encoder–decoder, one greedy step (one new decoder row) at a time (qkv.explain.measures,
    "the encoder–decoder's cross-attention"). Columns of a composition: the S source tokens, then the target
    inputs (<bos> and each generated token) up to ``width``.

    ``encoder_map`` (S, S): the encoder's whole-model mixing (MeasureObserver over ``encode``). After the
    decode, ``cross[step]`` (L, S + 1) holds each layer's cross-attention shares (the source positions, then
    the residual) and ``final[step]`` (width,) the composition of the decoder's last state."""

    def __init__(self, n_layers: int, encoder_map: torch.Tensor, width: int):
        s = encoder_map.shape[0]
        self.source = torch.cat([encoder_map, encoder_map.new_zeros(s, width - s)], 1)  # (S, W)
        self.width, self.n_source = width, s
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]  # state entering layer l, per pos
        self.cross: list[list[torch.Tensor]] = []
        self.final: list[torch.Tensor] = []
        self.pending: tuple | None = None
        self.after_self: torch.Tensor | None = None

    def __call__(self, q, k, *, v=None, mask=None, causal=False, out_proj=None, **_):
        self.pending = (q[0], k[0], v[0], mask, causal, out_proj)  # batch of one, one new query row

    def residual(self, x, z, *, norm=None, out=None):
        q, k, v, mask, causal, out_proj = self.pending
        layer, h = self.layer, q.shape[0]
        alpha = weight_rows(q[None], k[None], [q.shape[1] - 1], mask=mask, causal=causal)[0, :, 0].float()  # (H, S)
        f = M.head_vectors(M.expand_heads(v.float(), h), M.head_projections(matrix(out_proj).float(), h))
        x, z = x[0, -1].float(), z[0, -1].float()  # (C,) each: the new row
        y = norm(z).float() if norm is not None else z
        if self.site == "self":
            pos = k.shape[1] - 1  # the new row's position among the target inputs
            if layer == 0:
                self.inputs[0].append(torch.nn.functional.one_hot(torch.tensor(self.n_source + pos),
                                                                  self.width).float())
                self.cross.append([])
            c = M.alti(y[None], M.step_token_vectors(alpha, f, x, pos, norm, z)[None])[0]  # (pos + 1,)
            self.after_self = c @ torch.stack(self.inputs[layer])  # (W,)
            return
        c = M.alti(y[None], M.step_token_vectors(alpha, f, x, None, norm, z)[None])[0]  # (S + 1,)
        state = c[:-1] @ self.source + c[-1] * self.after_self
        self.inputs[layer + 1].append(state)
        self.cross[-1].append(c)
        if layer + 1 == len(self.inputs) - 1:
            self.final.append(state)
