"""What one forward of a text leaves behind for the live explorer, and the rows computed from it.

Legend: L layers, H query heads, K kv heads, T tokens, D head dim.

A page asks for one query row at a time (a click), in any layer, head and measure. Keeping every layer's
queries, keys and values exactly as the attention core received them makes each click one scaled dot
product per key (qkv.nn.attention.weight_rows) — the same numbers `qkv explain` records — without running
the model again. Kept per text, float32: q (L, H, T, D), k and v (L, K, T, D), and what the norms need
for any row in O(L·H·T + L·T·H²): each key's value norm per head and its per-key Gram matrix of head
outputs (qkv.explain.measures). For SmolLM2 at 8,192 tokens that is ~0.88 GiB of q/k/v and ~0.08 GiB of
norms' tables. The logit measure is kept for the prediction after the text (the last position): the
embedding, the MLPs' updates and the final state at that row.
"""

from __future__ import annotations

import base64
import threading

import torch

from ..errors import InputError
from ..explain import measures as M
from ..explain.capture import _check_measures, _kind, _token_id, check_context
from ..explain.record import AttentionRecord, MeasureMap, find_sinks, word_spans
from ..nn.attention import weight_rows
from ..nn.observer import AttentionObserver
from ..nn.quant import exact_weights, matrix

SERVED_MEASURES = ("weights", "norms", "logit", "mixing", "rollout")
ROW_MEASURES = ("weights", "norms", "logit")  # from the kept tensors, per click
WHOLE_MEASURES = ("mixing", "rollout")  # need every layer's T x T map: one more forward, kept for short texts
MAX_WHOLE_TOKENS = 512  # mixing and rollout kept as (L, T, T) float32 maps: ~63 MB for 30 layers at 512
SINK_SAMPLE = 64  # rows sampled (evenly, the last included) to find the sinks of a long text
HEATMAP_CELLS = 1024  # the most cells a heatmap answer has per side
HEAT_CHUNK = 256  # query rows computed at a time for a heatmap
FEW_ROWS = 4  # up to this many rows (a click), the per-layer norms of all layers in one einsum


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` in storage of its own size: a view (v is a slice of the fused q/k/v projection's output) would
    keep the whole buffer alive — at 8k tokens ~0.7 GiB more than the kept tensors themselves."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


class _Keep(AttentionObserver):
    """Keeps each layer's q, k, v and output projection, and the residual stream at the last row."""

    def __init__(self):
        self.layers: list[dict] = []
        self.x0 = self.final = None
        self.mlp_last: list[torch.Tensor] = []

    def __call__(self, q, k, *, v=None, mask=None, causal=False, out_proj=None):
        self.layers.append(dict(q=_own(q[0]), k=_own(k[0]), v=_own(v[0]), mask=mask, causal=causal,
                                out_proj=out_proj))

    def residual(self, x, z, *, norm=None, out=None):
        if self.x0 is None:
            self.x0 = x[0, -1].float()
        if out is not None and norm is None:  # a pre-norm block: the MLP's update is out − z
            self.mlp_last.append(out[0, -1].float() - z[0, -1].float())
            self.final = out[0, -1].float()


class TextState:
    """A text after one forward of a loaded model: tokens, words, sinks, and the tensors every row needs."""

    def __init__(self, loaded, text: str, lock: threading.Lock | None = None):
        if hasattr(loaded.config, "n_decoder_layers"):
            raise InputError(f"{loaded.name} is an encoder–decoder: the live explorer shows self-attention models; "
                             "see its cross-attention with qkv explain TEXT --model RUN")
        ids, offsets, special = check_context(loaded, text)
        keep = _Keep()
        causal = _kind(loaded) == "causal"
        with torch.inference_mode(), exact_weights(loaded.model):
            loaded.model(torch.tensor([ids], device=loaded.device), observer=keep,
                         **({"last_only": True} if causal else {}))
        self.loaded, self.text, self.ids = loaded, text, ids
        self.lock = lock or threading.Lock()  # the model's: held while the model runs again (mixing, rollout)
        self.causal = causal
        self.tokens = loaded.tokenizer.token_strings(ids)
        self.spans = word_spans(text, offsets, special)
        self.q = [s["q"] for s in keep.layers]
        self.k = [s["k"] for s in keep.layers]
        self.mask = [s["mask"] for s in keep.layers]
        self.out_proj = [s["out_proj"] for s in keep.layers]
        self.v = [s["v"].float() for s in keep.layers]  # (K, T, D): each kv head once
        wo = [M.head_projections(matrix(p).float(), q.shape[0]) for p, q in zip(self.out_proj, self.q)]
        with torch.inference_mode():  # the (H, T, D) expansion of one layer's values at a time, then dropped
            vh = lambda i: M.expand_heads(self.v[i], self.n_heads)  # noqa: E731
            self.value_norms = torch.stack([M.value_norms(vh(i), w) for i, w in enumerate(wo)])  # (L, H, T)
            self.grams = [M.key_grams(vh(i), w) for i, w in enumerate(wo)]  # L x (T, H, H)
        self.stacked = all(m is None for m in self.mask)  # one batched product over the layers per click
        if self.stacked:
            self.q_all, self.k_all = torch.stack(self.q), torch.stack(self.k)  # (L, H, T, D), (L, K, T, D)
            self.q, self.k = list(self.q_all.unbind(0)), list(self.k_all.unbind(0))
            for s, q, k in zip(keep.layers, self.q, self.k):  # the per-layer originals are freed
                s["q"], s["k"] = q, k
            self.grams_all = torch.stack(self.grams)  # (L, T, H, H)
            self.grams = list(self.grams_all.unbind(0))
        self.keep = keep
        self.sinks = self._sinks()
        self.whole: AttentionRecord | None = None  # mixing and rollout of every row, on first request

    @property
    def n_layers(self) -> int:
        return len(self.q)

    @property
    def n_heads(self) -> int:
        return self.q[0].shape[0]

    def nbytes(self) -> int:
        tensors = self.q + self.k + self.v + self.grams + [self.value_norms]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _alpha(self, layer: int, rows: list[int]) -> torch.Tensor:
        """Exact weights (H, R, T) of the rows in one layer, from the kept q and k."""
        return weight_rows(self.q[layer][None], self.k[layer][None], rows, mask=self.mask[layer],
                           causal=self.causal)[0].float()

    def _alpha_layers(self, rows: list[int]) -> torch.Tensor:
        """Exact weights (L, H, R, T) of the rows in every layer: one batched product when no layer has a mask."""
        if self.stacked:
            return weight_rows(self.q_all, self.k_all, rows, causal=self.causal).float()
        return torch.stack([self._alpha(layer, rows) for layer in range(self.n_layers)])

    def _sinks(self) -> list[dict]:
        t = len(self.ids)
        n = min(t, SINK_SAMPLE)
        rows = sorted({round(i * (t - 1) / max(1, n - 1)) for i in range(n)})  # every row of a short text
        with torch.inference_mode():
            w = self._alpha_layers(rows)  # (L, H, R, T)
        return find_sinks(w, self.value_norms, rows, self.tokens, causal=self.causal)

    @torch.inference_mode()
    def record(self, queries: list[int], measures=("weights", "norms"), target=None, foil=None) -> AttentionRecord:
        """An AttentionRecord of the ``queries`` rows over every layer and head, with the chosen measures —
        the same record `qkv.capture(..., queries=queries)` gives, from the kept tensors."""
        t = len(self.ids)
        bad = [q for q in queries if not 0 <= q < t]
        if bad or not queries:
            raise InputError(f"query {bad[0] if bad else '(none)'} is outside the text's {t} tokens")
        wanted = _check_measures(self.loaded, measures)
        if wanted - set(SERVED_MEASURES):
            raise InputError(f"the live explorer computes {', '.join(SERVED_MEASURES)}; "
                             f"{', '.join(sorted(wanted - set(SERVED_MEASURES)))}: use qkv explain")
        alpha = self._alpha_layers(queries)  # (L, H, Q, T)
        maps = {}
        if wanted & set(WHOLE_MEASURES):
            whole = self._whole()
            rows = torch.tensor(queries)
            for name in sorted(wanted & set(WHOLE_MEASURES)):
                m = whole.measure(name)
                maps[name] = MeasureMap(name, layers=m.layers[:, rows], model=m.model[rows])
        if "norms" in wanted:
            heads = M.shares(alpha * self.value_norms[:, :, None, :])
            if self.stacked and len(queries) <= FEW_ROWS:  # ‖Σ_h α^h_ij f^h_j‖ for every layer at once
                sq = torch.einsum("lhrs,lshg,lgrs->lrs", alpha, self.grams_all, alpha)
                layers = M.shares(sq.clamp(min=0).sqrt())
            else:
                layers = torch.stack([M.shares(M.layer_norms(alpha[i], self.grams[i]))
                                      for i in range(self.n_layers)])
            maps["norms"] = MeasureMap("norms", heads=heads, layers=layers)
        if "logit" in wanted:
            maps["logit"] = self._logit(queries, alpha, target, foil)
        all_l, all_h = list(range(self.n_layers)), list(range(self.n_heads))
        return AttentionRecord(alpha, self.tokens, self.tokens, list(queries), all_l, all_h,
                               kind="causal" if self.causal else "self", model=self.loaded.name,
                               key_words=self.spans, query_words=self.spans, measures=maps, sinks=self.sinks)

    def _whole(self) -> AttentionRecord:
        """Mixing and rollout of every row (qkv.capture over the whole text, one more forward), kept."""
        if self.whole is None:
            t = len(self.ids)
            if t > MAX_WHOLE_TOKENS:
                raise InputError(f"mixing and rollout need every layer's full {t} x {t} map; the live explorer keeps "
                                 f"them for texts up to {MAX_WHOLE_TOKENS} tokens: use qkv explain TEXT --measure "
                                 "mixing for this one")
            from ..explain.capture import capture

            with self.lock:  # the model runs again: one forward at a time per model
                self.whole = capture(self.loaded, self.text, heads=[0], measures=list(WHOLE_MEASURES))
        return self.whole

    @torch.inference_mode()
    def heatmap(self, layer: int, head: int | None, measure: str, r0: int, r1: int, c0: int, c1: int,
                cells: int = HEATMAP_CELLS) -> dict:
        """A layer's map (one head, or the heads' mean) over query rows [r0, r1) and keys [c0, c1), as at most
        ``cells`` x ``cells`` values: each the largest of a block of rows x keys when the range is bigger
        (``block`` says how big; 1 x 1 = the exact values), float32 little-endian in base64, row-major. Weights,
        or norms as row shares."""
        t = len(self.ids)
        if not (0 <= r0 < r1 <= t and 0 <= c0 < c1 <= t):
            raise InputError(f"the heatmap's range rows {r0}..{r1}, keys {c0}..{c1} is outside the text's {t} tokens")
        if measure not in ("weights", "norms"):
            raise InputError(f"the heatmap shows weights or norms, not {measure!r}")
        cells = max(1, min(int(cells), HEATMAP_CELLS))
        br, bc = -(-(r1 - r0) // cells), -(-(c1 - c0) // cells)  # block sizes (ceil)
        nr, nc = -(-(r1 - r0) // br), -(-(c1 - c0) // bc)
        heads = list(range(self.n_heads)) if head is None else [head]
        out = torch.zeros(nr, nc)
        step = max(br, HEAT_CHUNK // br * br)  # whole blocks of rows at a time
        for a in range(r0, r1, step):
            rows = list(range(a, min(a + step, r1)))
            alpha = self._alpha(layer, rows)[heads]  # (H', R, T)
            if measure == "norms":
                alpha = M.shares(alpha * self.value_norms[layer, heads][:, None, :])
            m = alpha.mean(0)[:, c0:c1]  # (R, C)
            pad_r, pad_c = -len(rows) % br, -(c1 - c0) % bc
            m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))  # values are >= 0: padding never wins a max
            pooled = m.view(m.shape[0] // br, br, m.shape[1] // bc, bc).amax(dim=(1, 3))
            i = (a - r0) // br
            out[i:i + pooled.shape[0]] = pooled
        return {"r0": r0, "r1": r1, "c0": c0, "c1": c1, "rows": nr, "cols": nc, "block": [br, bc],
                "values": base64.b64encode(out.numpy().astype("<f4").tobytes()).decode("ascii")}

    def _logit(self, queries: list[int], alpha: torch.Tensor, target, foil) -> MeasureMap:
        """The logit measure at the last position: per layer Σ_h α^h_nj v^h_j·(W_O^hᵀ u) by key position."""
        n = len(self.ids) - 1
        if queries != [n] or self.keep.final is None:
            raise InputError(f"the logit measure explains the prediction after the text, made at its last token "
                             f"(position {n})")
        model = self.loaded.model
        final_norm = model.model.norm
        row = model.lm_head(final_norm(self.keep.final[None].to(final_norm.weight.dtype))).float()[0]  # (V,)
        t = _token_id(self.loaded, target, "target") if target is not None else int(row.argmax())
        f = _token_id(self.loaded, foil, "foil") if foil is not None else None
        if f == t:
            raise InputError("target and foil are the same token: choose two different tokens")
        u = M.logit_direction(matrix(model.lm_head).float(), final_norm, self.keep.final, t, f)
        per_layer = []
        rest = sum(self.keep.mlp_last, torch.zeros_like(u))
        for i, (v, p) in enumerate(zip(self.v, self.out_proj)):
            per_layer.append(M.logit_by_key(alpha[i, :, 0], v, M.head_projections(matrix(p).float(), self.n_heads), u))
            if p.bias is not None:
                rest = rest + p.bias.float()
        per_layer = torch.stack(per_layer)  # (L, T)
        direct = torch.zeros(len(self.ids))
        direct[n] = float(self.keep.x0 @ u)
        strings = self.loaded.tokenizer.token_strings([t] + ([f] if f is not None else []))
        info = {"target": strings[0], "target_id": t, "foil": strings[1] if f is not None else None, "foil_id": f,
                "logit_difference": float(row[t] - (row[f] if f is not None else 0)), "remainder": float(rest @ u),
                "direct": float(direct.sum()), "position": n}
        return MeasureMap("logit", layers=per_layer[:, None], model=(per_layer.sum(0) + direct)[None], signed=True,
                          info=info)
