"""Capture exact attention weights while the model computes on its fast path.

The model's attention layers hand the observer their queries and keys exactly as the core receives
them (after RoPE, with the whole KV cache); the observer rebuilds only the requested rows with one
scaled dot product per key and an fp32 softmax (``qkv.nn.attention.weight_rows``). The model's own
output still comes from the fused kernel, untouched. Memory is O(L·H·R·T) for R requested query
rows, never O(L·H·T²) unless every row is asked for.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import InputError
from ..nn.attention import weight_rows
from .record import AttentionRecord, check_finite_rows, word_spans


class RowObserver:
    """Collects weight rows (H_sel, R, S) per layer. ``rows=None``: all queries; ``"last"``: the newest."""

    def __init__(self, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
                 rows: Sequence[int] | str | None = None):
        self.layers = None if layers is None else set(layers)
        self.heads = None if heads is None else list(heads)
        self.rows = rows
        self.layer = 0  # set by the model before each layer
        self.captured: dict[int, torch.Tensor] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, mask=None, causal: bool = False) -> None:
        if self.layers is not None and self.layer not in self.layers:
            return
        rows = [q.shape[2] - 1] if self.rows == "last" else self.rows
        if self.heads is not None:
            h, kh = q.shape[1], k.shape[1]
            q = q[:, self.heads]
            k = k[:, [i // (h // kh) for i in self.heads]]  # each chosen query head's own kv head
        w = weight_rows(q, k, rows, mask=mask, causal=causal)  # (B, H_sel, R, S)
        self.captured[self.layer] = w[0].float()


def _check_selection(loaded, layers, heads) -> tuple[list[int], list[int]]:
    n_layers, n_heads = _sizes(loaded)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    heads = list(range(n_heads)) if heads is None else [int(x) for x in heads]
    for what, vals, n in (("layer", layers, n_layers), ("head", heads, n_heads)):
        bad = [v for v in vals if not 0 <= v < n]
        if bad or not vals:
            raise InputError(f"{what} {bad[0] if bad else '(none)'} is out of range: {loaded.name} has {n} "
                             f"{what}s, numbered 0..{n - 1}")
    return layers, heads


def _sizes(loaded) -> tuple[int, int]:
    c = loaded.config
    if hasattr(c, "n_decoder_layers"):  # the 2017 encoder–decoder: its decoder's (cross-attention) layers
        return c.n_decoder_layers, c.n_heads
    return c.num_hidden_layers, c.num_attention_heads


def _kind(loaded) -> str:
    return "causal" if getattr(loaded.model, "is_causal", True) else "self"


@torch.inference_mode()
def capture(loaded, text: str, *, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
            queries: Sequence[int] | None = None) -> AttentionRecord:
    """Attention of ``text`` in a loaded model: weights (L, H, Q, T) of the chosen layers, heads and query
    positions (None = all), with the tokens, their word spans, and the model's name."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text is empty: give a sentence to look at")
    layers, heads = _check_selection(loaded, layers, heads)
    ids, offsets, special = loaded.tokenizer.encode_with_offsets(text)
    n_ctx = getattr(loaded.config, "max_position_embeddings", len(ids))
    if len(ids) > n_ctx:
        raise InputError(f"the text has {len(ids)} tokens but {loaded.name}'s context window is {n_ctx}; shorten it")
    queries = list(range(len(ids))) if queries is None else [int(q) % len(ids) for q in queries]
    obs = RowObserver(layers, heads, queries)
    loaded.model(torch.tensor([ids], device=loaded.device), observer=obs)
    weights = torch.stack([obs.captured[layer] for layer in layers])  # (L, H, Q, T)
    check_finite_rows(weights)
    tokens = loaded.tokenizer.token_strings(ids)
    spans = word_spans(text, offsets, special)
    return AttentionRecord(weights, tokens, tokens, queries, layers, heads, kind=_kind(loaded), model=loaded.name,
                           key_words=spans, query_words=spans)


def capture_generation(loaded, prompt: str | Sequence[Mapping[str, Any]], *, chat: bool | None = None,
                       layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
                       **gen_options) -> Iterator[tuple[Any, AttentionRecord | None]]:
    """Generate, and for each new token record its attention row over prompt + generated tokens.

    Yields ``(piece, None)`` while generating and finally ``(None, record)`` whose queries are the
    positions of the generated tokens (each row covers the keys that existed at that step; later keys
    are 0) and whose ``key_roles`` mark the chat template's roles when a conversation was given.
    """
    from ..generate.text import generate, prompt_ids

    layers, heads = _check_selection(loaded, layers, heads)
    ids = prompt_ids(loaded, prompt, chat=chat)
    obs = _StepObserver(layers, heads)
    new_ids: list[int] = []
    for piece in generate(loaded, prompt, ids=ids, observer=obs, **gen_options):
        if piece.token_id is not None:
            new_ids.append(piece.token_id)
        yield piece, None
    yield None, _generation_record(loaded, prompt, ids, new_ids, obs, layers, heads)


class _StepObserver(RowObserver):
    """Keeps the newest query's row at every forward call: the prefill's last row, then each step's."""

    def __init__(self, layers, heads):
        super().__init__(layers, heads, "last")
        self.steps: list[dict[int, torch.Tensor]] = []

    def __call__(self, q, k, *, mask=None, causal=False):
        if self.layer not in self.layers:
            return
        if self.layer == min(self.layers):
            self.steps.append({})
        super().__call__(q, k, mask=mask, causal=causal)
        self.steps[-1][self.layer] = self.captured.pop(self.layer, None)


def _generation_record(loaded, prompt, ids, new_ids, obs, layers, heads) -> AttentionRecord:
    all_ids = list(ids) + list(new_ids)
    n = len(all_ids)
    steps = obs.steps[:len(new_ids)]  # step i's query produced new token i
    w = torch.zeros(len(layers), len(heads), len(steps), n)
    for i, step in enumerate(steps):
        for li, layer in enumerate(layers):
            row = step[layer][:, -1]  # (H, S_i)
            w[li, :, i, :row.shape[-1]] = row
    queries = [len(ids) - 1 + i for i in range(len(steps))]
    tokens = loaded.tokenizer.token_strings(all_ids)
    roles = _roles(loaded, all_ids, len(ids), n) if not isinstance(prompt, str) else []
    return AttentionRecord(w, tokens, tokens, queries, layers, heads, kind="causal", model=loaded.name,
                           key_roles=roles, note="row i = the query that produced generated token i")


ROLE_NAMES = ("system", "user", "assistant", "tool", "ipython", "developer")


def _roles(loaded, ids: list[int], n_prompt: int, n_total: int) -> list[str]:
    """Role of each token, read off the rendered prompt: a special token followed by a role name
    (ChatML's ``<|im_start|>user``, Llama 3's ``<|start_header_id|>user``) opens that role's turn."""
    tok = loaded.tokenizer
    strings = tok.token_strings(ids[:n_prompt])
    roles, current = [], "template"
    for i, i_id in enumerate(ids[:n_prompt]):
        if i_id in tok.special_ids:
            after = "".join(strings[i + 1:i + 5]).lstrip().lower()  # a role name may be split into pieces
            current = next((r for r in ROLE_NAMES if after.startswith(r)), current)
        roles.append(current)
    return roles + ["generated"] * (n_total - n_prompt)


def word_positions(loaded, text: str, word: str, occurrence: int = 1) -> list[int]:
    """Token positions of the n-th occurrence of ``word`` in ``text`` (word = tokens not split by spaces)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text is empty: give a sentence to look at")
    ids, offsets, special = loaded.tokenizer.encode_with_offsets(text)
    spans = word_spans(text, offsets, special)
    tokens = loaded.tokenizer.token_strings(ids)
    probe = AttentionRecord(torch.zeros(1, 1, 1, len(ids)), tokens, tokens, [0], [0], [0],
                            key_words=spans, query_words=spans)  # only for its word lookup
    a, b = spans[probe.find_word(word, occurrence)]
    return list(range(a, b))


@torch.inference_mode()
def capture_cross(loaded, text: str, *, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
                  max_new_tokens: int = 64) -> tuple[str, AttentionRecord]:
    """An encoder–decoder's greedy output for ``text`` and its cross-attention: for each output token,
    how much the decoder query that produced it attends to each source token (kind "cross").

    Returns ``(output text, record)``; the record's query tokens are the output tokens (ending with
    ``<eos>`` when the model stopped), its key tokens the source tokens (ending with ``<eos>``)."""
    if not isinstance(text, str) or not text:
        raise InputError("the text is empty: give a source string for the encoder–decoder")
    model, vocab = loaded.model, loaded.tokenizer
    layers, heads = _check_selection(loaded, layers, heads)
    src_ids = vocab.encode(text) + [vocab.eos_id]
    src = torch.tensor([src_ids], device=loaded.device)  # (1, S)
    memory = model.encode(src)
    caches = model.make_caches(1, max_new_tokens + 1, src.shape[1])
    obs = _StepObserver(layers, heads)
    out, nxt = [], torch.tensor([[vocab.bos_id]], device=loaded.device)  # (1, 1)
    for _ in range(max_new_tokens):
        nxt = model.decode(nxt, memory, caches=caches, observer=obs)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(nxt))
        if out[-1] == vocab.eos_id:
            break
    w = torch.stack([torch.stack([step[layer][:, -1] for layer in layers]) for step in obs.steps[:len(out)]], 2)
    check_finite_rows(w)  # (L, H, Q, S)
    q_tokens, k_tokens = vocab.token_strings(out), vocab.token_strings(src_ids)
    record = AttentionRecord(w, q_tokens, k_tokens, list(range(len(out))), layers, heads, kind="cross",
                             model=loaded.name, note="row i = the decoder query that produced output token i")
    return vocab.decode(out), record
