"""Embedding space: a token's nearest neighbours among the input embedding rows, and how the same word's
hidden state inside a text (after layer L) has moved away from its own row — embeddings becoming contextual.

    from qkv.explain.embedding_view import embedding_space, render_embedding_space
    space = embedding_space(loaded, "bank", texts=["He sat on the river bank", "I opened a bank account"],
                            layer=15, k=10)
    space.embedding      # Neighbours of the token's own row E[t] (itself left out)
    space.contexts[i]    # Context: the hidden state h after layer L at the word's position, and its Neighbours
    print(render_embedding_space(space))

Similarity is the cosine ⟨v, E[j]⟩ / (‖v‖‖E[j]‖), in float64, against every row j of the input embedding
matrix E (V, C) that is a token of the tokenizer (padding rows past it, and all-zero rows, are left out). The
static list leaves the token itself out (its cosine is 1); a context list keeps it and also reports where the
word's own row ranks (``self_rank``) and its cosine at every layer (``self_by_layer``): how far the state has
moved from it. The hidden state is the residual stream leaving layer L (before the final norm), from the
model's observer hook (qkv.explain.lens.trace_position). Random directions in C dimensions have cosines of
about ±1/√C; a hidden state's neighbours at that level are noise, not meaning.

With texts, the word is found as the text's own token (``bank`` typed finds `` bank``, spaces trimmed, else
ignoring case), and the static list shows that token's row, the one the (first) text uses; alone, the word
must be one token as typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from .lens import _namer, check_llama, trace_position, word_position

__all__ = ["Neighbours", "Context", "EmbeddingSpace", "embedding_space", "nearest_rows", "single_token",
           "render_embedding_space"]

MAX_TEXTS = 4  # context columns side by side


@dataclass(frozen=True)
class Neighbours:
    """The nearest embedding rows of one vector: ids, readable tokens and float64 cosines, best first."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    cosines: tuple[float, ...]
    self_rank: int | None = None  # rank (1 = nearest) of the word's own row, when it is not left out
    self_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"neighbours": [{"rank": r + 1, "id": i, "token": s, "cosine": c} for r, (i, s, c)
                                              in enumerate(zip(self.ids, self.tokens, self.cosines))]}
        if self.self_rank is not None:
            out.update(self_rank=self.self_rank, self_cosine=self.self_cosine)
        return out


@dataclass(frozen=True)
class Context:
    """The word inside one text: its position, its token, its hidden state after ``layer`` and the state's
    neighbours among the embedding rows."""

    text: str
    layer: int
    position: int
    token_id: int
    token: str
    tokens: tuple[str, ...]
    state: torch.Tensor  # (C,) float32, CPU
    neighbours: Neighbours
    self_by_layer: tuple[float, ...]  # cos(state after layer l, the token's own row) for every layer l

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "layer": self.layer, "position": self.position, "token_id": self.token_id,
                "token": self.token, "tokens": list(self.tokens), "state_norm": float(self.state.double().norm()),
                **self.neighbours.to_dict(), "self_cosine_by_layer": list(self.self_by_layer)}


@dataclass(frozen=True)
class EmbeddingSpace:
    model: str
    word: str
    token_id: int
    token: str
    k: int
    rows: int  # embedding rows compared
    embedding: Neighbours
    contexts: tuple[Context, ...]
    dim: int  # C: random directions have cosines of about ±1/√C

    def between_contexts(self) -> list[list[float]]:
        """(N, N) float64 cosines between the contexts' hidden states."""
        return [[float(_cos64(a.state[None], b.state)[0]) for b in self.contexts] for a in self.contexts]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "word": self.word, "token_id": self.token_id, "token": self.token, "k": self.k,
                "rows_compared": self.rows, "similarity": "cosine", "random_cosine_scale": 1 / self.dim ** 0.5,
                "embedding": self.embedding.to_dict(), "contexts": [c.to_dict() for c in self.contexts],
                "cosine_between_contexts": self.between_contexts()}


def check_options(k: int, texts: Sequence[str], layer: int | None) -> None:
    """Validate what needs no model."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"-k must be an integer >= 1 (how many neighbours), got {k!r}")
    if layer is not None and not texts:
        raise InputError("--layer needs --text: the layer whose hidden state of the word to compare")
    if len(texts) > MAX_TEXTS:
        raise InputError(f"at most {MAX_TEXTS} texts side by side, got {len(texts)}")


def single_token(loaded, token: str) -> int:
    """The id of ``token`` when it is exactly one token (no BOS/EOS), else a one-line error saying how it
    tokenizes."""
    if not isinstance(token, str) or not token:
        raise InputError("the token is empty: give a word that is one token, e.g. ' bank'")
    tok = loaded.tokenizer
    ids = tok.encode(token, add_special=False)
    if len(ids) == 1:
        return ids[0]
    pieces = tok.token_strings(ids)
    hint = ""
    if not token.startswith(" ") and len(tok.encode(" " + token, add_special=False)) == 1:
        hint = f"; with its leading space {' ' + token!r} is one token"
    raise InputError(f"{token!r} is not one token: it tokenizes as {pieces}{hint}")


def nearest_rows(matrix: torch.Tensor, vector: torch.Tensor, k: int, *, exclude: int | None = None,
                 rows: int | None = None, own: int | None = None) -> tuple[list[int], list[float], tuple]:
    """The ``k`` rows of ``matrix`` (V, C) nearest to ``vector`` (C,) by float64 cosine, among the first ``rows``
    rows, leaving out ``exclude`` and all-zero rows. Returns (ids, cosines, (rank, cosine) of row ``own``, or
    (None, None))."""
    cos = cosines(matrix[: rows or matrix.shape[0]], vector)  # (V,) float64
    if exclude is not None:
        cos[exclude] = float("-inf")
    top = cos.topk(min(k, int(torch.isfinite(cos).sum())))
    rank = cos_own = None
    if own is not None and own < cos.shape[0]:
        cos_own = float(cos[own])
        rank = int((cos > cos[own]).sum()) + 1
    return top.indices.tolist(), top.values.tolist(), (rank, cos_own)


def cosines(matrix: torch.Tensor, vector: torch.Tensor, *, chunk: int = 8192) -> torch.Tensor:
    """(V,) float64 cosine of each row of ``matrix`` (V, C) with ``vector`` (C,), in row chunks (a float64 copy
    of a whole 128k-token embedding would be gigabytes); all-zero rows get -inf."""
    v = vector.to(matrix.device, torch.float64)
    out = []
    for start in range(0, matrix.shape[0], chunk):
        r = matrix[start:start + chunk].double()  # (chunk, C)
        n = r.norm(dim=-1)
        c = (r @ v) / (n * v.norm()).clamp_min(1e-300)
        out.append(c.masked_fill(n == 0, float("-inf")))
    return torch.cat(out).cpu()


def _cos64(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N,) float64 cosines of rows (N, C) with v (C,)."""
    r, x = rows.double().cpu(), v.double().cpu()
    return (r @ x) / (r.norm(dim=-1) * x.norm()).clamp_min(1e-300)


@torch.inference_mode()
def embedding_space(loaded, word: str, *, texts: Sequence[str] = (), layer: int | None = None,
                    k: int = 10, occurrence: int = 1) -> EmbeddingSpace:
    """Neighbours of ``word``'s input embedding row, and (for each text) of its hidden state after ``layer``
    (default: the middle layer; negative counts from the end) at its position in the text."""
    from .capture import check_context

    texts = list(texts)
    check_options(k, texts, layer)
    check_llama(loaded, "embed-space")
    n_layers = loaded.config.num_hidden_layers
    if texts:
        layer = n_layers // 2 if layer is None else layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise InputError(f"layer {layer} is out of range: {loaded.name} has {n_layers} layers, numbered "
                             f"0..{n_layers - 1} (or -1 for the last)")
        layer %= n_layers
    placed = []
    for text in texts:
        ids, _, _ = check_context(loaded, text)
        placed.append((text, ids, _word_in_text(loaded, text, ids, word, occurrence)))
    token_id = placed[0][1][placed[0][2]] if placed else single_token(loaded, word)
    emb = loaded.model.model.embed_tokens.weight.detach()
    rows = min(emb.shape[0], loaded.tokenizer.vocab_size)
    name = _namer(loaded)
    ids, cos, _ = nearest_rows(emb, emb[token_id], k, exclude=token_id, rows=rows)
    static = Neighbours(tuple(ids), tuple(name(i) for i in ids), tuple(cos))
    contexts = []
    for text, ids_t, pos in placed:
        states = trace_position(loaded, ids_t, pos)["stream_out"]  # (L, C) leaving each layer
        own = ids_t[pos]
        n_ids, n_cos, (rank, c_own) = nearest_rows(emb, states[layer], k, rows=rows, own=own)
        near = Neighbours(tuple(n_ids), tuple(name(i) for i in n_ids), tuple(n_cos), rank, c_own)
        by_layer = tuple(_cos64(states, emb[own]).tolist())
        contexts.append(Context(text, layer, pos, own, name(own), tuple(loaded.tokenizer.token_strings(ids_t)),
                                states[layer], near, by_layer))
    return EmbeddingSpace(loaded.name, word, token_id, name(token_id), k, rows, static, tuple(contexts),
                          dim=emb.shape[1])


def _word_in_text(loaded, text: str, ids: list[int], word: str, occurrence: int) -> int:
    """The position of the one token that is ``word`` in the text; a word of several tokens is refused."""
    from .capture import word_positions

    if not isinstance(word, str) or not word.strip():
        raise InputError("the token is empty: give a word that is one token, e.g. ' bank'")
    pos = word_position(loaded, text, ids, word, occurrence)
    strings = loaded.tokenizer.token_strings(ids)
    if strings[pos].strip().lower() == word.strip().lower():
        return pos
    span = word_positions(loaded, text, word, occurrence)
    pieces = [strings[i] for i in span]
    raise InputError(f"{word.strip()!r} is {len(span)} tokens in the text ({pieces}); embed-space compares one "
                     "token's embedding row: choose a word that is one token")


# --- terminal -------------------------------------------------------------------------------------------

_COL = 30


def render_embedding_space(space: EmbeddingSpace) -> str:
    """The static neighbours and each context's, side by side: rank, token, cosine."""
    from ..text.inspect import visible

    heads = [f"input embedding of {_clip(visible(space.token), 12)!r}"]
    heads += [f"after layer {c.layer}: {_clip(c.text, _COL - 15)!r}" for c in space.contexts]
    lines = [f"{space.model} — nearest tokens by cosine similarity among {space.rows:,} input embedding rows",
             f"{space.word!r}: token {space.token_id} {visible(space.token)!r}"
             + ("" if not space.contexts else "; in each text, the word's hidden state after the layer (the residual "
                                              "stream, before the final norm)"),
             "   #  " + "".join(_cell(h) for h in heads)]
    cols = [space.embedding] + [c.neighbours for c in space.contexts]
    for r in range(space.k):
        cells = [_cell(f"{_clip(visible(n.tokens[r]), _COL - 10):<{_COL - 9}} {n.cosines[r]:+.3f}")
                 if r < len(n.ids) else _cell("") for n in cols]
        lines.append(f"{r + 1:>4}  " + "".join(cells))
    if space.contexts:
        own = [_cell("(itself left out)")]
        own += [_cell(f"{_clip(visible(c.token), 10)!r}: rank {c.neighbours.self_rank:,}, "
                      f"{c.neighbours.self_cosine:+.3f}") for c in space.contexts]
        lines.append("self  " + "".join(own))
        noise = 1 / space.dim ** 0.5
        lines.append(f"(random directions in {space.dim} dimensions have cosines of about ±{noise:.3f}, 1/√C)")
        if len(space.contexts) > 1:
            m = space.between_contexts()
            pairs = [f"{i + 1}–{j + 1} {m[i][j]:+.3f}" for i in range(len(m)) for j in range(i + 1, len(m))]
            lines.append(f"cosine between the word's hidden states in the texts (text 1, 2, …): {', '.join(pairs)}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(s: str) -> str:
    from rich.cells import cell_len

    return s + " " * max(1, _COL + 2 - cell_len(s))


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[:limit - 1] + "…"
