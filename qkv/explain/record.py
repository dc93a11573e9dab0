"""AttentionRecord: what the renderers consume — validated weights and the tokens they are about.

Legend: L captured layers, H captured heads, Q captured queries, K keys.

``weights[l, h, i, j]`` is how much captured query ``queries[i]`` attends to key ``j`` in layer
``layers[l]``, head ``heads[h]``; each row sums to 1 (or is all zero for a query that sees nothing).

Word view: consecutive tokens not separated by white space form one word ("river" + "'s"). A word's
weight as a *key* is the **sum** over its pieces (attention mass is additive); a word's row as a
*query* is the **mean** over its pieces' rows (each piece's row is a distribution; the mean is one too).
Special tokens (BOS, [CLS], …) are words of their own.

Attention sinks: models park much of their attention on the first token. ``without_sink()`` drops key 0
and renormalises each row; every renderer labels such a view.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import InputError

KINDS = ("self", "causal", "cross")


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
            if spans and (spans[0][0] != 0 or spans[-1][1] != n or
                          any(a >= b or b != c for (a, b), (c, _) in zip(spans, spans[1:] + [(n, n)]))):
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

    def row(self, query: int, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """Weights (K,) of one captured query; layer/head None = the mean over captured ones."""
        qi = _index(self.queries, query, "query position")
        w = self.weights[:, :, qi]  # (L, H, K)
        w = w[self.index_of_layer(layer)][None] if layer is not None else w
        w = w[:, self.index_of_head(head)][:, None] if head is not None else w
        return w.mean(dim=(0, 1))

    def without_sink(self) -> "AttentionRecord":
        """Drop key 0 (BOS / the attention sink) and renormalise each row to sum to 1."""
        if self.sink_removed or len(self.key_tokens) < 2:
            return self
        w = self.weights[..., 1:]
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), w)
        return replace(self, weights=w, key_tokens=self.key_tokens[1:], key_words=_shift_spans(self.key_words),
                       key_roles=self.key_roles[1:], sink_removed=True,
                       note=(self.note + "; " if self.note else "") + "first token (sink) removed, rows renormalised")

    # -- word view -------------------------------------------------------------------------------

    def word_labels(self, side: str = "key") -> list[str]:
        toks = self.key_tokens if side == "key" else self.query_tokens
        spans = (self.key_words if side == "key" else self.query_words) or [(i, i + 1) for i in range(len(toks))]
        return ["".join(toks[a:b]).strip() or "".join(toks[a:b]) for a, b in spans]

    def word_row(self, query_word: int, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """Weights over key words of one query word (mean over its captured pieces, sum over key pieces)."""
        spans = self.query_words or [(i, i + 1) for i in range(len(self.query_tokens))]
        a, b = spans[query_word]
        pieces = [q for q in range(a, b) if q in self.queries]
        if not pieces:
            raise InputError(f"word {query_word} has no captured query token")
        rows = torch.stack([self.row(q, layer, head) for q in pieces]).mean(0)  # (K,)
        return sum_over_words(rows, self.key_words)

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


def sum_over_words(row: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    if not spans:
        return row
    return torch.stack([row[a:b].sum() for a, b in spans])


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
