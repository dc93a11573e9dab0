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
from ..nn.observer import AttentionObserver
from ..nn.quant import exact_weights, matrix
from .record import AttentionRecord, MeasureMap, check_finite_rows, find_sinks, word_spans


class RowObserver(AttentionObserver):
    """Collects weight rows (H_sel, R, S) per layer. ``rows=None``: all queries; ``"last"``: the newest."""

    def __init__(self, layers: Iterable[int] | None = None, heads: Iterable[int] | None = None,
                 rows: Sequence[int] | str | None = None):
        self.layers = None if layers is None else set(layers)
        self.heads = None if heads is None else list(heads)
        self.rows = rows
        self.layer = 0  # set by the model before each layer
        self.captured: dict[int, torch.Tensor] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, mask=None, causal: bool = False, **_) -> None:
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
            queries: Sequence[int] | None = None, measures: Iterable[str] | str = ("weights",),
            target: str | int | None = None, foil: str | int | None = None) -> AttentionRecord:
    """Attention of ``text`` in a loaded model: weights (L, H, Q, T) of the chosen layers, heads and query
    positions (None = all), with the tokens, their word spans, and the model's name.

    ``measures``: any of weights, norms, mixing, rollout, logit, alti-logit (qkv.explain.measures), computed in
    the same forward pass while the model runs its fast kernels; ``record.values(name, layer, head)`` reads them.
    Whenever a model hands over its values, the per-head norms are computed too and ``record.sinks`` lists
    the attention sinks; with weights and norms alone a Llama's forward stops after the deepest chosen layer.
    ``logit`` explains the next-token prediction at the last captured query:
    ``target`` (default: the model's top token there) against ``foil`` (default: none, the target's logit
    alone), each a token id or a string that is exactly one token."""
    ids, offsets, special = check_context(loaded, text)
    wanted = _check_measures(loaded, measures)
    if wanted != {"weights"} and not _gives_values(loaded):
        raise InputError("an encoder–decoder's measures come from capture_cross (its cross-attention)")
    layers, heads = _check_selection(loaded, layers, heads)
    queries = list(range(len(ids))) if queries is None else [int(q) % len(ids) for q in queries]
    tokens = loaded.tokenizer.token_strings(ids)
    spans = word_spans(text, offsets, special)
    if wanted == {"weights"} and not _gives_values(loaded):
        obs = RowObserver(layers, heads, queries)
        with exact_weights(loaded.model):
            loaded.model(torch.tensor([ids], device=loaded.device), observer=obs)
        weights = torch.stack([obs.captured[layer] for layer in layers])  # (L, H, Q, T)
        check_finite_rows(weights)
        return AttentionRecord(weights, tokens, tokens, queries, layers, heads, kind=_kind(loaded),
                               model=loaded.name, key_words=spans, query_words=spans)
    from .trace import MeasureObserver

    obs = MeasureObserver(layers, heads, queries, wanted, logit_row=queries[-1])  # the prediction row: the last
    kind = _kind(loaded)
    causal_lm = kind == "causal"  # its logits are needed at the prediction row alone (logit measure)
    # weights and norms read nothing past the deepest chosen layer; mixing, rollout and the logits go through all
    last = max(layers) if wanted <= PER_LAYER else None
    with exact_weights(loaded.model):  # a dtype="auto" model's compact copies would serve a short text
        loaded.model(torch.tensor([ids], device=loaded.device), observer=obs,
                     **({"last_only": True} if causal_lm else {}), **_forward_options(loaded.model, last))
        maps = _measure_maps(loaded, obs, wanted, layers, target, foil)  # the logit measures' unembedding too
    weights = torch.stack([obs.per_head["weights"][layer] for layer in layers]).cpu()  # (L, H, Q, T)
    check_finite_rows(weights)
    value_norms = torch.stack([obs.value_norms[layer] for layer in layers]).cpu()  # (L, H, T)
    sinks = find_sinks(weights, value_norms, queries, tokens, causal=causal_lm)
    return AttentionRecord(weights, tokens, tokens, queries, layers, heads, kind=kind, model=loaded.name,
                           key_words=spans, query_words=spans, measures=maps, sinks=sinks)


PER_LAYER = {"weights", "norms"}  # the measures each layer gives by itself


def _forward_options(model, last: int | None) -> dict:
    """The forward's options to stop early, where the model has them: capture reads no logits from the
    forward (the logit measures unembed their own row), and an exact unembedding costs a dequantisation of
    its whole (V, C) matrix; with ``last``, nothing after that layer either (``layers=[3]`` runs 4 layers)."""
    from ..models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return {}
    return {"unembed": False} if last is None else {"stop_after": last}


def check_context(loaded, text: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """The text's ids, character offsets and special flags, refused when empty or longer than the context."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text is empty: give a sentence to look at")
    ids, offsets, special = loaded.tokenizer.encode_with_offsets(text)
    n_ctx = getattr(loaded.config, "max_position_embeddings", len(ids))
    if len(ids) > n_ctx:
        raise InputError(f"the text has {len(ids)} tokens but {loaded.name}'s context window is {n_ctx}; shorten it")
    return ids, offsets, special


def _gives_values(loaded) -> bool:
    """Self-attention models whose blocks report their residual stream (Llama, BERT) give every measure."""
    return not hasattr(loaded.config, "n_decoder_layers")


def _check_measures(loaded, measures) -> set[str]:
    from .measures import MEASURES

    wanted = {measures} if isinstance(measures, str) else set(measures)
    bad = sorted(wanted - set(MEASURES))
    if bad or not wanted:
        raise InputError(f"unknown measure {bad[0] if bad else '(none)'!r}: choose from {', '.join(MEASURES)}")
    if wanted & {"logit", "alti-logit"} and _kind(loaded) != "causal":
        raise InputError(f"the logit measure explains a next-token prediction, and {loaded.name} is an encoder "
                         "with no language-model head: use weights, norms, mixing or rollout")
    return wanted | {"weights"}


def _measure_maps(loaded, obs, wanted, layers, target, foil) -> dict:
    """The MeasureMaps of the requested measures from what the observer computed (on the CPU)."""
    stack = lambda d: torch.stack([d[layer] for layer in layers]).cpu()  # noqa: E731
    maps = {}
    if "norms" in wanted:
        maps["norms"] = MeasureMap("norms", heads=stack(obs.per_head["norms"]), layers=stack(obs.per_layer["norms"]),
                                   info={"value_norms": stack(obs.value_norms)})
    for name in ("mixing", "rollout"):
        if name in wanted:
            maps[name] = MeasureMap(name, layers=stack(obs.per_layer[name]), model=obs.model_rows(name).cpu())
    for name in ("logit", "alti-logit"):
        if name in wanted:
            maps[name] = _logit_map(loaded, obs, layers, target, foil, name)
    return maps


def _logit_map(loaded, obs, layers, target, foil, name: str) -> MeasureMap:
    from .measures import logit_direction

    n = obs.logit_row
    model = loaded.model
    final_norm = model.model.norm
    # the model's own final norm and unembedding on x_n (after the last layer): its logits at the prediction
    # row, computed there alone
    row = model.lm_head(final_norm(obs.final_state[None].to(final_norm.weight.dtype))).float()[0]  # (V,)
    t = _token_id(loaded, target, "target") if target is not None else int(row.argmax())
    f = _token_id(loaded, foil, "foil") if foil is not None else None
    if f == t:
        raise InputError("--target and --foil are the same token: choose two different tokens")
    u = logit_direction(matrix(model.lm_head).float(), final_norm, obs.final_state, t, f)
    per_layer, direct, remainder = obs.logit(u, carried=name == "alti-logit")
    total = per_layer.sum(0) + direct  # (T,)
    actual = float(row[t] - (row[f] if f is not None else 0))
    strings = loaded.tokenizer.token_strings([t] + ([f] if f is not None else []))
    info = {"target": strings[0], "target_id": t, "foil": strings[1] if f is not None else None, "foil_id": f,
            "logit_difference": actual, "remainder": remainder, "direct": float(direct.sum()), "position": n}
    keep = torch.tensor(layers)
    return MeasureMap(name, layers=per_layer[keep][:, None].cpu(), model=total[None].cpu(), signed=True,
                      info=info)


def _token_id(loaded, token: str | int, what: str) -> int:
    """A token id from an id or from a string that encodes to exactly one token."""
    vocab = loaded.config.vocab_size
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < vocab:
            raise InputError(f"--{what} id {token} is outside the vocabulary (0..{vocab - 1})")
        return token
    if not isinstance(token, str) or not token:
        raise InputError(f"--{what} must be a token: a non-empty string or a token id")
    ids = loaded.tokenizer.encode(token)
    if len(ids) != 1:
        pieces = loaded.tokenizer.token_strings(ids)
        hint = "" if token.startswith(" ") else f"; a word after a space usually needs its space: {' ' + token!r}"
        raise InputError(f"--{what} {token!r} is not one token: it tokenizes as {pieces}{hint}")
    return ids[0]


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

    def __init__(self, layers, heads, norms: bool = False, only_site: str | None = None):
        super().__init__(layers, heads, "last")
        self.only_site = only_site  # the encoder–decoder's decoder: its cross-attention only
        self.steps: list[dict[int, torch.Tensor]] = []
        self.norms = norms  # also each step's norms (per head and per layer) from its values
        self.norm_steps: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []

    def __call__(self, q, k, *, mask=None, causal=False, v=None, out_proj=None, **_):
        if self.layer not in self.layers or self.only_site not in (None, self.site):
            return
        if self.layer == min(self.layers):
            self.steps.append({})
            self.norm_steps.append({})
        super().__call__(q, k, mask=mask, causal=causal)
        self.steps[-1][self.layer] = self.captured.pop(self.layer, None)
        if self.norms:
            self.norm_steps[-1][self.layer] = _last_row_norms(q, k, v, out_proj, mask, causal, self.heads)


def _last_row_norms(q, k, v, out_proj, mask, causal, heads) -> tuple[torch.Tensor, torch.Tensor]:
    """Norm shares of the newest query: per chosen head (H_sel, S) and per layer (S,) (qkv.explain.measures)."""
    from . import measures as M

    h = q.shape[1]
    alpha = weight_rows(q, k, [q.shape[2] - 1], mask=mask, causal=causal)[0].float()  # (H, 1, S)
    vh = M.expand_heads(v[0].float(), h)  # (H, S, D)
    wo = M.head_projections(matrix(out_proj).float(), h)
    per_head = M.shares(alpha[heads] * M.value_norms(vh, wo)[heads, None, :])[:, 0]
    per_layer = M.shares(M.layer_norms(alpha, M.key_grams(vh, wo)))[0]
    return per_head, per_layer


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
                  max_new_tokens: int = 64,
                  measures: Iterable[str] | str = ("weights",)) -> tuple[str, AttentionRecord]:
    """An encoder–decoder's greedy output for ``text`` and its cross-attention: for each output token,
    how much the decoder query that produced it attends to each source token (kind "cross").

    Returns ``(output text, record)``; the record's query tokens are the output tokens (ending with
    ``<eos>`` when the model stopped), its key tokens the source tokens (ending with ``<eos>``).

    ``measures``: weights, norms (‖α·W_O v‖ per head and per layer) and mixing — per layer the cross-attention's
    ALTI shares of the source positions (``info["residual"]``: the decoder state's own share), and as the model
    view each output state's composition over the source tokens through encoder and decoder (ALTI+;
    ``info["target_share"]``: the part made of <bos> and the earlier outputs)."""
    if not isinstance(text, str) or not text:
        raise InputError("the text is empty: give a source string for the encoder–decoder")
    model, vocab = loaded.model, loaded.tokenizer
    layers, heads = _check_selection(loaded, layers, heads)
    wanted = _check_cross_measures(measures)
    src_ids = vocab.encode(text) + [vocab.eos_id]
    src = torch.tensor([src_ids], device=loaded.device)  # (1, S)
    mix = None
    if "mixing" in wanted:  # ALTI through the encoder first: what each source position's memory is made of
        from .trace import CrossMixing, MeasureObserver

        enc = MeasureObserver([], [], [], {"mixing"})
        memory = model.encode(src, observer=enc)
        mix = CrossMixing(loaded.config.n_decoder_layers, enc.mix_total, len(src_ids) + max_new_tokens + 1)
    else:
        memory = model.encode(src)
    caches = model.make_caches(1, max_new_tokens + 1, src.shape[1])
    obs = _StepObserver(layers, heads, norms="norms" in wanted, only_site="cross")
    watch = obs if mix is None else _Fanout(obs, mix)
    out, nxt = [], torch.tensor([[vocab.bos_id]], device=loaded.device)  # (1, 1)
    for _ in range(max_new_tokens):
        nxt = model.decode(nxt, memory, caches=caches, observer=watch)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(nxt))
        if out[-1] == vocab.eos_id:
            break
    w = torch.stack([torch.stack([step[layer][:, -1] for layer in layers]) for step in obs.steps[:len(out)]], 2)
    check_finite_rows(w)  # (L, H, Q, S)
    q_tokens, k_tokens = vocab.token_strings(out), vocab.token_strings(src_ids)
    maps = {}
    if "norms" in wanted:
        steps = obs.norm_steps[:len(out)]
        per_head = torch.stack([torch.stack([s[layer][0] for layer in layers]) for s in steps], 2)  # (L, H, Q, S)
        per_layer = torch.stack([torch.stack([s[layer][1] for layer in layers]) for s in steps], 1)  # (L, Q, S)
        maps["norms"] = MeasureMap("norms", heads=per_head.cpu(), layers=per_layer.cpu())
    if mix is not None:
        maps["mixing"] = _cross_mixing_map(mix, layers, len(out))
    record = AttentionRecord(w, q_tokens, k_tokens, list(range(len(out))), layers, heads, kind="cross",
                             model=loaded.name, note="row i = the decoder query that produced output token i",
                             measures=maps)
    return vocab.decode(out), record


def _check_cross_measures(measures) -> set[str]:
    from .measures import MEASURES

    wanted = {measures} if isinstance(measures, str) else set(measures)
    bad = sorted(wanted - set(MEASURES))
    if bad or not wanted:
        raise InputError(f"unknown measure {bad[0] if bad else '(none)'!r}: choose from weights, norms, mixing")
    other = sorted(wanted - {"weights", "norms", "mixing"})
    if other:
        raise InputError(f"{', '.join(other)}: an encoder–decoder's cross-attention gives weights, norms and mixing "
                         "(rollout composes one stack of self-attention; the logit measures explain a decoder-only "
                         "model's next token)")
    return wanted | {"weights"}


def _cross_mixing_map(mix, layers: list[int], n_out: int) -> MeasureMap:
    """Per layer the cross-attention's source shares (L, Q, S), each row summing to 1 − its residual share;
    the model view (Q, S) the final decoder state's source part (ALTI+), the rest being the target prefix's."""
    s = mix.n_source
    cross = torch.stack([torch.stack(step) for step in mix.cross[:n_out]])  # (Q, L_all, S + 1)
    final = torch.stack(mix.final[:n_out])  # (Q, W)
    sel = cross[:, layers]  # (Q, L, S + 1)
    info = {"residual": sel[..., -1].T.cpu(), "target_share": final[:, s:].sum(-1).cpu(),
            "source_share": final[:, :s].sum(-1).cpu()}
    return MeasureMap("mixing", layers=sel[..., :-1].permute(1, 0, 2).cpu(), model=final[:, :s].cpu(), info=info)


class _Fanout(AttentionObserver):
    """Hands every call to several observers, with the layer and site the model set."""

    def __init__(self, *observers: AttentionObserver):
        self.observers = observers

    def __call__(self, q, k, **kw):
        for o in self.observers:
            o.layer, o.site = self.layer, self.site
            o(q, k, **kw)

    def residual(self, x, z, **kw):
        for o in self.observers:
            o.layer, o.site = self.layer, self.site
            o.residual(x, z, **kw)
