"""AttentionRecord: what the renderers consume — validated weights and the tokens they are about.

Legend: L captured layers, H captured heads, Q captured queries, K keys.

``weights[l, h, i, j]`` is how much captured query ``queries[i]`` attends to key ``j`` in layer
``layers[l]``, head ``heads[h]``; each row sums to 1 (or is all zero for a query that sees nothing).

Word view: consecutive tokens not separated by white space form one word ("river" + "'s"). A word's
weight as a *key* is the **sum** over its pieces (attention mass is additive); a word's row as a
*query* is the **mean** over its pieces' rows (each piece's row is a distribution; the mean is one too).
Special tokens (BOS, [CLS], …) are words of their own.

Attention sinks: models park much of their attention on the first token. ``without_sink()`` drops key 0
and renormalises each row; every renderer labels such a view. ``sinks`` lists the keys detected as sinks
from the measures themselves (:func:`find_sinks`): a large share of the weight on small value vectors.

Measures (qkv.explain.measures): ``measures[name]`` is a :class:`MeasureMap` with up to three views — per
head (L, H, Q, K), per layer (L, Q, K) and the whole model (Q, K). ``values(name, layer, head)`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import InputError

KINDS = ("self", "causal", "cross")
SINK_WEIGHT = 0.2  # a sink takes at least this share of the attention weight (mean over layers, heads, rows) ...
SINK_SIZE = 0.5  # ... while its value vectors are at most this fraction of the median key's


@dataclass(frozen=True)
class MeasureMap:
    """One measure's views. Non-negative measures hold row shares (rows sum to 1); ``signed`` ones (logit)
    hold contributions in their own unit. ``info`` carries what a view needs to be read (logit: target,
    foil, the actual logit difference, the direct embedding term and the remainder)."""

    name: str
    heads: torch.Tensor | None = None  # (L, H, Q, K)
    layers: torch.Tensor | None = None  # (L, Q, K)
    model: torch.Tensor | None = None  # (Q, K)
    signed: bool = False
    info: dict = field(default_factory=dict)

    def drop_first_key(self) -> "MeasureMap":
        fix = (lambda t: t[..., 1:]) if self.signed else (lambda t: _renormalise(t[..., 1:]))
        return replace(self, **{k: fix(getattr(self, k)) for k in ("heads", "layers", "model")
                                if getattr(self, k) is not None})


def _consecutive(spans, n: int) -> bool:
    """[start, end) spans, each non-empty, each starting where the last ended, from 0 to n (vectorised: a
    served click builds a record over 8k spans)."""
    t = torch.as_tensor(spans, dtype=torch.long)
    if t.dim() != 2 or t.shape[1] != 2:
        return False
    return bool(t[0, 0] == 0 and t[-1, 1] == n and (t[:, 0] < t[:, 1]).all() and (t[1:, 0] == t[:-1, 1]).all())


@dataclass(frozen=True)
class AttentionRecord:
    weights: torch.Tensor  # (L, H, Q, K) float32
    query_tokens: list[str]  # all query-side tokens (Q indexes into these through `queries`)
    key_tokens: list[str]
    queries: list[int]  # positions in query_tokens of the captured rows
    layers: list[int]
    heads: list[int]
    kind: str = "self"
    model: str = ""
    key_words: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token spans
    query_words: list[tuple[int, int]] = field(default_factory=list)
    key_roles: list[str] = field(default_factory=list)  # chat role of each key token, if any
    sink_removed: bool = False
    note: str = ""
    measures: dict = field(default_factory=dict)  # name -> MeasureMap (qkv.capture(..., measures=...))
    sinks: list = field(default_factory=list)  # [{"position", "token", "weight", "size", "why"}] (find_sinks)

    def __post_init__(self):
        w = self.weights
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise InputError("AttentionRecord.weights must be a 4-d tensor (layers, heads, queries, keys)")
        n_l, n_h, n_q, n_k = w.shape
        if (len(self.layers), len(self.heads), len(self.queries), len(self.key_tokens)) != (n_l, n_h, n_q, n_k):
            raise InputError(f"AttentionRecord: weights {tuple(w.shape)} do not match {len(self.layers)} layers, "
                             f"{len(self.heads)} heads, {len(self.queries)} queries, {len(self.key_tokens)} keys")
        if any(not 0 <= q < len(self.query_tokens) for q in self.queries):
            raise InputError("AttentionRecord: a captured query is outside query_tokens")
        if self.kind not in KINDS:
            raise InputError(f"AttentionRecord.kind must be one of {KINDS}, got {self.kind!r}")
        for name, spans, n in (("key_words", self.key_words, n_k), ("query_words", self.query_words,
                                                                      len(self.query_tokens))):
            if spans and not _consecutive(spans, n):
                raise InputError(f"AttentionRecord.{name} must be consecutive spans covering all {n} tokens")
        if self.key_roles and len(self.key_roles) != n_k:
            raise InputError("AttentionRecord.key_roles must have one role per key token")
        if self.weights.dtype != torch.float32:
            object.__setattr__(self, "weights", self.weights.float())

    # -- selections ------------------------------------------------------------------------------

    def index_of_layer(self, layer: int) -> int:
        return _index(self.layers, layer, "layer")

    def index_of_head(self, head: int) -> int:
        return _index(self.heads, head, "head")

    def row(self, query: int, layer: int | None = None, head: int | None = None,
            measure: str = "weights") -> torch.Tensor:
        """One captured query's row (K,) of a measure; layer/head None = the measure's mean or model view."""
        qi = _index(self.queries, query, "query position")
        if measure == "weights":
            w = self.weights[:, :, qi]  # (L, H, K)
            w = w[self.index_of_layer(layer)][None] if layer is not None else w
            w = w[:, self.index_of_head(head)][:, None] if head is not None else w
            return w.mean(dim=(0, 1))
        vals = self.values(measure, layer, head)
        if vals.shape[0] == len(self.queries):
            return vals[qi]
        position = self.measure(measure).info["position"]  # a prediction measure: one row, at its position
        if query != position:
            raise InputError(f"{measure} explains the prediction made at position {position} only, not at {query}")
        return vals[0]

    def values(self, measure: str, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """(Q, K) of a measure: one head of one layer, one head averaged over layers, one layer, or the model
        view (weights: the mean over layers and heads; norms: the mean of the layers' maps; mixing, rollout,
        logit: the whole-model map)."""
        if measure == "weights":
            w = self.weights
            w = w[self.index_of_layer(layer)][None] if layer is not None else w
            w = w[:, self.index_of_head(head)][:, None] if head is not None else w
            return w.mean(dim=(0, 1))
        m = self.measure(measure)
        if head is not None:
            if m.heads is None:
                raise InputError(f"{measure} is computed per layer, not per head: drop --head")
            w = m.heads[:, self.index_of_head(head)]  # (L, Q, K)
            return w[self.index_of_layer(layer)] if layer is not None else w.mean(0)
        if layer is not None:
            if m.layers is None:
                raise InputError(f"{measure} has only a whole-model view: drop --layer")
            return m.layers[self.index_of_layer(layer)]
        return m.model if m.model is not None else m.layers.mean(0)

    def measure(self, name: str) -> MeasureMap:
        if name not in self.measures:
            have = ", ".join(["weights", *self.measures])
            raise InputError(f"measure {name!r} was not captured (captured: {have}); ask capture for it")
        return self.measures[name]

    def without_sink(self) -> "AttentionRecord":
        """Drop key 0 (BOS / the attention sink) and renormalise each row to sum to 1."""
        if self.sink_removed or len(self.key_tokens) < 2:
            return self
        return replace(self, weights=_renormalise(self.weights[..., 1:]), key_tokens=self.key_tokens[1:],
                       key_words=_shift_spans(self.key_words), key_roles=self.key_roles[1:], sink_removed=True,
                       measures={k: m.drop_first_key() for k, m in self.measures.items()},
                       sinks=[{**s, "position": s["position"] - 1} for s in self.sinks if s["position"] > 0],
                       note=(self.note + "; " if self.note else "") + "first token (sink) removed, rows renormalised")

    def _repr_html_(self) -> str:
        """Jupyter (and VS Code, Colab, nbviewer): the offline explorer inline, in a sandboxed iframe that can
        run its own script and nothing else — no CDN, no require.js, nothing fetched."""
        import html

        from .render_html import explorer_html

        page = explorer_html(self, title=f"qkv — {self.model}" if self.model else "qkv")
        return (f'<iframe sandbox="allow-scripts" style="width:100%;height:760px;border:1px solid #e2e8f0" '
                f'srcdoc="{html.escape(page, quote=True)}"></iframe>')

    # -- word view -------------------------------------------------------------------------------

    def word_labels(self, side: str = "key") -> list[str]:
        toks = self.key_tokens if side == "key" else self.query_tokens
        spans = (self.key_words if side == "key" else self.query_words) or [(i, i + 1) for i in range(len(toks))]
        return ["".join(toks[a:b]).strip() or "".join(toks[a:b]) for a, b in spans]

    def word_row(self, query_word: int, layer: int | None = None, head: int | None = None,
                 measure: str = "weights") -> torch.Tensor:
        """A measure over key words of one query word (mean over its captured pieces, sum over key pieces)."""
        spans = self.query_words or [(i, i + 1) for i in range(len(self.query_tokens))]
        a, b = spans[query_word]
        pieces = [q for q in range(a, b) if q in self.queries]
        if not pieces:
            raise InputError(f"word {query_word} has no captured query token")
        rows = torch.stack([self.row(q, layer, head, measure) for q in pieces]).mean(0)  # (K,)
        return sum_over_words(rows, self.key_words)

    def chart(self, positions: list[int], *, layer: int | None = None, head: int | None = None, words: bool = True,
              measure: str = "weights") -> tuple[list[str], torch.Tensor, int | None]:
        """The bars of one query word (its token ``positions``): labels, values and the query's own bar.

        Word view: mean over the query word's pieces, sum over each key word's pieces. Token view: the mean
        row of the word's pieces over key tokens. What `qkv explain` prints and `qkv serve` sends."""
        rows = torch.stack([self.row(p, layer, head, measure) for p in positions]).mean(0)
        if not words:
            return list(self.key_tokens), rows, None
        values = sum_over_words(rows, self.key_words)
        # the query word's own bar (absent when it was the dropped sink token)
        own = [i for i, (a, b) in enumerate(self.key_words) if a <= positions[0] - self.sink_removed < b]
        return self.word_labels("key"), values, own[0] if own else None

    def find_word(self, word: str, occurrence: int = 1, side: str = "query") -> int:
        """Index of the n-th word equal to ``word`` (case-insensitive, punctuation-trimmed match allowed)."""
        labels = self.word_labels(side)
        want = word.strip().lower()
        hits = [i for i, w in enumerate(labels) if w.lower() == want]
        if not hits:
            hits = [i for i, w in enumerate(labels) if w.lower().strip(".,;:!?\"'()[]") == want]
        if not hits:
            shown = ", ".join(repr(w) for w in labels[:40])
            raise InputError(f"{word!r} is not a word of the text; its words are: {shown}")
        if not 1 <= occurrence <= len(hits):
            raise InputError(f"{word!r} occurs {len(hits)} time(s); --occurrence must be 1..{len(hits)}")
        return hits[occurrence - 1]


def _renormalise(w: torch.Tensor) -> torch.Tensor:
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), w)


def find_sinks(weights: torch.Tensor, value_norms: torch.Tensor, queries: list[int], tokens: list[str],
               causal: bool) -> list[dict]:
    """Positions that take a large share of the attention weight but whose value vectors are small.

    ``weights`` (L, H, Q, K) and ``value_norms`` (L, H, K), ‖W_O^h v^h_j‖ of the same layers and heads. A key's
    weight is averaged over layers, heads and the rows that can see it (a causal row sees keys up to
    itself); its size is its value norm over the median value norm of the keys, averaged over layers and
    heads. A sink takes >= SINK_WEIGHT of the weight (and twice a uniform row's share) at <= SINK_SIZE of the
    median size: the heads park
    attention there and take little from it (Kobayashi et al. 2020; Xiao et al. 2024)."""
    sinks = []
    size = (value_norms / value_norms.median(-1, keepdim=True).values.clamp(min=1e-12)).mean((0, 1))  # (K,)
    for j in range(weights.shape[-1]):
        seen = [i for i, q in enumerate(queries) if not causal or q >= j]
        if not seen or weights.shape[-1] < 2:
            continue
        w, r = float(weights[:, :, seen, j].mean()), float(size[j])
        visible = sum(q + 1 if causal else weights.shape[-1] for q in (queries[i] for i in seen)) / len(seen)
        if w >= max(SINK_WEIGHT, 2 / visible) and r <= SINK_SIZE:  # at least twice a uniform row's share
            sinks.append({"position": j, "token": tokens[j], "weight": round(w, 4), "size": round(r, 3),
                          "why": f"takes {w:.0%} of the attention weight, but its value vectors are {r:.2f}x the "
                                 "median size: weight parked there, little taken from it"})
    return sinks


def sum_over_words(row: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """(K,) over tokens -> (W,) over words: each word's pieces summed (one index_add, not a loop of sums)."""
    if not spans:
        return row
    sizes = torch.tensor([b - a for a, b in spans])  # the spans cover every token (checked by the record)
    word_of = torch.repeat_interleave(torch.arange(len(spans)), sizes).to(row.device)  # (K,) token -> word
    return torch.zeros(len(spans), dtype=row.dtype, device=row.device).index_add_(0, word_of, row)


def _shift_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Key spans after dropping token 0 (a span that held only token 0 disappears)."""
    out = [(max(a - 1, 0), b - 1) for a, b in spans]
    return [(a, b) for a, b in out if b > a]


def _index(values: list[int], v: int, what: str) -> int:
    try:
        return values.index(v)
    except ValueError:
        raise InputError(f"{what} {v} was not captured (captured: {values[:20]})") from None


def word_spans(text: str, offsets: list[tuple[int, int]], special: list[bool]) -> list[tuple[int, int]]:
    """Group tokens into words: a new word starts at a special token, after one, or after white space."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(offsets) + 1):
        if i == len(offsets):
            spans.append((start, i))
            break
        prev_end, (cur_start, _) = offsets[i - 1][1], offsets[i]
        gap = text[prev_end:cur_start] if 0 <= prev_end <= cur_start else ""
        begins = special[i] or special[i - 1] or bool(gap) or text[cur_start:cur_start + 1].isspace()
        if begins:
            spans.append((start, i))
            start = i
    return spans


def check_finite_rows(w: torch.Tensor) -> None:
    """Rows must be finite and sum to 1 (or 0 for queries that see nothing)."""
    if not torch.isfinite(w).all():
        raise InputError("attention weights contain NaN or Inf")
    s = w.sum(-1)
    bad = ((s - 1).abs() > 1e-4) & (s.abs() > 1e-6)
    if bool(bad.any()):
        raise InputError(f"attention rows do not sum to 1 (worst {float((s - 1).abs().max()):.2e})")
