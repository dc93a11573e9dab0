"""Text in, text out: the prompt or chat messages to token ids, and the streamed pieces back to text."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from ..errors import InputError, TemplateError
from .loop import Piece, generate_ids
from .sampling import SamplingOptions


def prompt_ids(loaded, prompt: str | Sequence[Mapping[str, Any]], *, chat: bool | None = None,
               system: str | None = None) -> list[int]:
    """Token ids of a plain prompt or of a conversation rendered by the model's chat template.

    ``chat=None`` means: a list of messages is a conversation, a string is plain text. ``chat=True``
    with a string makes it one user message (after an optional system message).
    """
    if not getattr(loaded.model, "is_causal", True):
        raise InputError(f"{loaded.name} is an encoder, it does not generate text; use a decoder such as smollm2")
    if isinstance(prompt, str) and not chat:
        if system:
            raise InputError("a system message needs chat mode (--chat)")
        return loaded.tokenizer.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    if loaded.chat_template is None:
        raise TemplateError(f"{loaded.name} has no chat template; generate from a plain prompt instead")
    return loaded.chat_template.encode(loaded.tokenizer, messages, add_generation_prompt=True)


def generate(loaded, prompt: str | Sequence[Mapping[str, Any]], *, chat: bool | None = None,
             system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None, observer=None,
             ids: Sequence[int] | None = None) -> Iterator[Piece]:
    """Stream a continuation of ``prompt`` as :class:`Piece` objects (see qkv.generate.loop).

    Generation ends at an end-of-sequence/end-of-turn token (not shown), after ``max_new_tokens``, or
    when the decoded text contains one of the ``stop`` strings (not shown either).
    """
    opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, seed=seed)
    stop = _check_stops(stop)
    tok = loaded.tokenizer
    ids = list(ids) if ids is not None else prompt_ids(loaded, prompt, chat=chat, system=system)
    eos = set(tok.eos_ids if stop_ids is None else stop_ids)
    stream = tok.stream(skip_special=True)
    pending, n = "", 0
    for n, token in enumerate(generate_ids(loaded.model, ids, opts, max_new_tokens=max_new_tokens,
                                            stop_ids=eos, observer=observer), start=1):
        if token in eos:
            yield Piece(pending + stream.flush(), None, "eos")
            return
        pending += stream.push(token)
        cut = _find_stop(pending, stop)
        if cut is not None:
            yield Piece(pending[:cut], token, None)
            yield Piece("", None, "stop")
            return
        keep = _held_back(pending, stop)
        yield Piece(pending[:len(pending) - keep], token, None)
        pending = pending[len(pending) - keep:]
    tail = pending + stream.flush()
    cut = _find_stop(tail, stop)
    yield Piece(tail if cut is None else tail[:cut], None, "stop" if cut is not None else "length")


def _check_stops(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise InputError("stop strings must be non-empty strings")
    return stop


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still be the start of a stop string (not printed yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep
