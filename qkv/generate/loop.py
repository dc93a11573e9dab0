"""The generation loop: prefill the prompt once, then decode one token at a time from the KV cache.

``generate_ids`` is the model-level iterator (token ids in, token ids out). ``generate`` adds the
tokenizer and the chat template: it takes a prompt string or a list of chat messages and yields
:class:`Piece` objects whose ``text`` is always whole UTF-8 characters, with stop strings matched on
the decoded text (so a stop string split across tokens still stops, and is not printed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import InputError
from .sampling import SamplingOptions, sample


@dataclass(frozen=True)
class Piece:
    """One step of a generation: the new text (may be empty while a character is incomplete), the
    token id (None on the final piece), and on the final piece why it ended: "eos", "length", "stop"."""

    text: str
    token_id: int | None = None
    finish_reason: str | None = None


# Prompts longer than this are prefilled in chunks of it, each attending to the cache of those before: the
# same logits to float rounding, with the (T, intermediate) activations of an 8k prompt ~8x smaller.
PREFILL_CHUNK = 2048


def check_budget(n_prompt: int, max_new_tokens: int, n_ctx: int) -> None:
    """Prompt + new tokens must fit the context window: an error before any model call (K8/K9)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if n_prompt == 0:
        raise InputError("the prompt has no tokens: give some text to continue")
    if n_prompt > n_ctx:
        raise InputError(f"the prompt has {n_prompt} tokens but the model's context window is {n_ctx}; "
                         "shorten the prompt")
    if n_prompt + max_new_tokens > n_ctx:
        raise InputError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                         f"window of {n_ctx} tokens; use max_new_tokens <= {n_ctx - n_prompt}")


@torch.inference_mode()
def generate_ids(model, prompt_ids: Sequence[int], opts: SamplingOptions, *, max_new_tokens: int,
                 stop_ids: Sequence[int] = (), observer=None) -> Iterator[int]:
    """Yield new token ids: prefill, then cached decode; stops after a stop id (which is yielded)."""
    n_ctx = model.config.max_position_embeddings
    check_budget(len(prompt_ids), max_new_tokens, n_ctx)
    if max_new_tokens == 0:
        return
    opts.check_vocab(model.config.vocab_size)
    device = next(model.parameters()).device
    gen = opts.generator(device)
    cache = model.make_cache(1, len(prompt_ids) + max_new_tokens)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    context = ids
    step = len(prompt_ids) if observer is not None else PREFILL_CHUNK  # a capture sees the prompt in one piece
    for start in range(0, len(prompt_ids), step):  # a long prompt in chunks: activations bounded by the chunk
        logits = model(ids[:, start:start + step], cache=cache, last_only=True, observer=observer)[:, -1]  # (1, V)
    stops = set(stop_ids)
    for step in range(max_new_tokens):
        nxt = sample(logits, opts, gen, context=context if opts.repetition_penalty != 1.0 else None, step=step)
        tok = int(nxt)
        yield tok
        if tok in stops or step == max_new_tokens - 1:
            return
        nxt = nxt.view(1, 1)
        if opts.repetition_penalty != 1.0:
            context = torch.cat([context, nxt], dim=1)
        logits = model(nxt, cache=cache, last_only=True, observer=observer)[:, -1]


@torch.inference_mode()
def generate_ids_batch(model, prompts: Sequence[Sequence[int]], opts: SamplingOptions, *, max_new_tokens: int,
                       stop_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Several prompts at once, left-padded: each row's tokens equal its unbatched run (A11).

    Positions come from the attention mask (count of real tokens), so padding shifts nothing.
    A row that has produced a stop id keeps decoding padding that is then dropped.
    """
    n_ctx = model.config.max_position_embeddings
    longest = max((len(p) for p in prompts), default=0)
    for p in prompts:
        check_budget(len(p), max_new_tokens, n_ctx)
    if longest + max_new_tokens > n_ctx:
        raise InputError(f"the longest prompt ({longest} tokens) + max_new_tokens exceeds the context of {n_ctx}")
    device = next(model.parameters()).device
    gen = opts.generator(device)
    b = len(prompts)
    ids = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, longest - len(p):] = True
    cache = model.make_cache(b, longest + max_new_tokens)
    logits = model(ids, cache=cache, attention_mask=mask, last_only=True)[:, -1]
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    for step in range(max_new_tokens):
        nxt = sample(logits, opts, gen, step=step)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.bool, device=device)], dim=1)
        logits = model(nxt.view(b, 1), cache=cache, attention_mask=mask, last_only=True)[:, -1]
    return out
