"""What a tokenizer makes of a text: every token with its id, vocabulary piece, bytes and kind.

    from qkv.text.inspect import inspect_tokens, render_tokens, marked_prompt
    report = inspect_tokens(loaded.tokenizer, "He sat on the river's bank 🤗")
    report = inspect_tokens(loaded.tokenizer, "Hi", template=loaded.chat_template)  # as one chat message
    print(render_tokens(report, model="smollm2"))
    print(marked_prompt(loaded.tokenizer, ids))    # a prompt as text, control tokens shown ⟨like this⟩

A token's kind is one of:

* ``special`` — a control token (``<|im_start|>``, ``[CLS]``): never produced by user text (T7);
* ``byte`` — bytes that are not a whole UTF-8 character by themselves: SentencePiece's byte-fallback
  pieces (``<0xE2>``), or a byte-level BPE piece that cuts a character (an emoji in two tokens);
* ``unknown`` — the vocabulary's UNK token, standing for text it cannot spell (WordPiece's ``[UNK]``);
* ``text`` — everything else.

Pure functions of a :class:`~qkv.text.tokenizer.Tokenizer` (and a chat template); nothing is loaded here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qkv.errors import InputError, TemplateError

if TYPE_CHECKING:
    from qkv.text.chat import ChatTemplate
    from qkv.text.tokenizer import Tokenizer

__all__ = ["TokenInfo", "TokenReport", "inspect_tokens", "marked_text", "marked_prompt", "render_tokens",
           "special_counts", "visible", "SPECIAL_OPEN", "SPECIAL_CLOSE"]

SPECIAL_OPEN, SPECIAL_CLOSE = "⟨", "⟩"  # how a control token is drawn inside text: ⟨<|im_start|>⟩
_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_MAX_CELL = 28  # widest piece/text cell in the table; longer ones end in …
_MAX_BYTES = 8  # bytes shown per token in the table (all of them in JSON)


@dataclass(frozen=True)
class TokenInfo:
    """One token of a text.

    ``piece``: the vocabulary entry as stored ('Ġbank', '▁bank', '##ing', '<0xE2>', '<|im_start|>').
    ``text``: what it stands for (spaces as spaces, bytes that are not a whole character as <0xNN>).
    ``data``: the exact bytes it adds to the text; None for control tokens. ``origin``: "text" (from the
    input), "template" (the chat template's markup) or "tokenizer" (added by the tokenizer: BOS, [CLS]).
    ``span``: [start, end) characters of the input it covers (None when it was added).
    """

    index: int
    id: int
    piece: str
    text: str
    data: bytes | None
    kind: str
    origin: str
    span: tuple[int, int] | None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "piece": self.piece, "text": self.text,
                "bytes": None if self.data is None else list(self.data), "kind": self.kind, "origin": self.origin,
                "span": None if self.span is None else list(self.span)}


@dataclass(frozen=True)
class TokenReport:
    """A text's tokens, with the counts a lecture asks for.

    ``text_tokens``: how many tokens the text alone makes (no BOS, no template). In chat mode ``tokens`` is
    the whole rendered prompt and ``rendered`` its text; ``message_tokens`` of them are the message's (the
    chat encoder may split the text differently, e.g. around typed ``<|im_end|>``), the rest the template's.
    """

    text: str
    tokens: tuple[TokenInfo, ...]
    vocabulary: str
    vocab_size: int
    text_tokens: int
    chat: bool = False
    rendered: str | None = None
    template_sha256: str | None = None

    @property
    def characters(self) -> int:
        return len(self.text)

    @property
    def utf8_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def message_tokens(self) -> int:
        return sum(t.origin == "text" for t in self.tokens)

    @property
    def added(self) -> int:
        """Tokens that are not the text's own: the chat template's (chat) or the tokenizer's (BOS, [CLS])."""
        return len(self.tokens) - self.message_tokens

    @property
    def special(self) -> tuple[TokenInfo, ...]:
        return tuple(t for t in self.tokens if t.kind == "special")

    def to_dict(self) -> dict[str, Any]:
        counts = {"characters": self.characters, "utf8_bytes": self.utf8_bytes, "tokens": len(self.tokens),
                  "text_tokens": self.text_tokens, "message_tokens": self.message_tokens, "added_tokens": self.added,
                  "special_tokens": len(self.special)}
        return {"text": self.text, "vocabulary": self.vocabulary, "vocab_size": self.vocab_size, "chat": self.chat,
                "counts": counts, "tokens": [t.to_dict() for t in self.tokens], "rendered": self.rendered,
                "template_sha256": self.template_sha256}


# --- building the report --------------------------------------------------------------------------------


def inspect_tokens(tokenizer: Tokenizer, text: str, *, template: ChatTemplate | None = None,
                   chat: bool | None = None, system: str | None = None) -> TokenReport:
    """Tokens of ``text`` as :meth:`Tokenizer.encode` makes them, or — with a ``template`` (``chat`` defaults
    to True then) — of the prompt the chat template makes of it as one user message (after ``system``)."""
    if not isinstance(text, str) or text == "":
        raise InputError("the text is empty: give some text to tokenize")
    chat = template is not None if chat is None else chat
    ids, offsets, added = tokenizer.encode_with_offsets(text)
    own = [(i, span) for i, span, a in zip(ids, offsets, added) if not a]
    if not chat:
        if system:
            raise InputError("a system message needs chat mode (--chat)")
        origins = ["tokenizer" if a else "text" for a in added]
        spans = [None if a else tuple(span) for span, a in zip(offsets, added)]
        return _report(tokenizer, text, ids, origins, spans, len(own))
    if template is None:
        raise TemplateError("this model has no chat template; tokenize the plain text instead (without --chat)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    chat_ids = template.encode(tokenizer, messages, add_generation_prompt=True)
    rendered = template.render(messages, add_generation_prompt=True)
    where = _content_range(template, messages, rendered, text)
    origins, spans = _place_in_prompt(tokenizer, chat_ids, text, rendered, where)
    if origins is None:
        origins, spans = _place_run(chat_ids, own)
    return _report(tokenizer, text, chat_ids, origins, spans, len(own), chat=True, rendered=rendered,
                   sha=template.sha256)


_PLACEHOLDER = "\ue000"  # a private-use character: no template changes it, no user text means it here


def _content_range(template: ChatTemplate, messages: list[dict], rendered: str, text: str) -> tuple[int, int] | None:
    """Where the user message sits in the rendered prompt, as [start, end) characters: render once more with
    a placeholder as its content; None when the template does not insert the content verbatim (it trims it…)."""
    probe = [*messages[:-1], {"role": "user", "content": _PLACEHOLDER}]
    shape = template.render(probe, add_generation_prompt=True)
    if shape.count(_PLACEHOLDER) != 1:
        return None
    before, after = shape.split(_PLACEHOLDER)
    if rendered != before + text + after:
        return None
    return len(before), len(before) + len(text)


def _place_in_prompt(tok: Tokenizer, ids: list[int], text: str, rendered: str, where: tuple[int, int] | None):
    """Each prompt token's origin and span in ``text``, from the exact bytes of the tokens (byte-level
    vocabularies, where they join to the rendered prompt): a token overlapping the message is the text's."""
    pieces: list[bytes] | None = tok._pieces  # noqa: SLF001 - exact bytes of each id, as decode uses them
    if pieces is None or where is None:
        return None, None
    data = [pieces[i] for i in ids]
    if b"".join(data) != rendered.encode("utf-8"):
        return None, None
    start = where[0]
    b0 = len(rendered[:start].encode("utf-8"))
    b1 = b0 + len(text.encode("utf-8"))
    char_starts, n = [], 0  # byte offset of each character of the text
    for ch in text:
        char_starts.append(n)
        n += len(ch.encode("utf-8"))
    origins, spans, at = [], [], 0
    for piece in data:
        s, e = at, at + len(piece)
        at = e
        if e <= b0 or s >= b1 or s == e:
            origins.append("template")
            spans.append(None)
            continue
        lo, hi = max(s, b0) - b0, min(e, b1) - b0
        origins.append("text")
        spans.append((bisect.bisect_right(char_starts, lo) - 1, bisect.bisect_right(char_starts, hi - 1)))
    return origins, spans


def _place_run(chat_ids: list[int], own: list[tuple[int, tuple[int, int]]]) -> tuple[list[str], list]:
    """Fallback: the message's own ids as one run in the prompt (the last such run: the user message comes
    after the system one). Where the template's context changed how the text splits, none is found and
    every token counts as the template's."""
    text_ids = [i for i, _ in own]
    n, origins, spans = len(text_ids), ["template"] * len(chat_ids), [None] * len(chat_ids)
    for start in range(len(chat_ids) - n, -1, -1):
        if n and chat_ids[start:start + n] == text_ids:
            for k, (_, span) in enumerate(own):
                origins[start + k], spans[start + k] = "text", tuple(span)
            break
    return origins, spans


def _report(tok: Tokenizer, text: str, ids: Sequence[int], origins: Sequence[str], spans: Sequence,
            text_tokens: int, *, chat: bool = False, rendered: str | None = None,
            sha: str | None = None) -> TokenReport:
    strings = tok.token_strings(ids)
    kind_of, data_of, name = _vocabulary(tok)
    tokens = []
    for n, (i, shown, origin, span) in enumerate(zip(ids, strings, origins, spans)):
        piece = tok.id_to_token(i)
        special = i in tok.special_ids
        data = None if special else data_of(i, piece)
        kind = "unknown" if i == tok.unk_id and origin == "text" else "special" if special else kind_of(piece, data)
        if name == "WordPiece" and not special:
            shown = shown.removeprefix("##")
        tokens.append(TokenInfo(n, int(i), piece, shown, data, kind, origin, span))
    return TokenReport(text, tuple(tokens), name, tok.vocab_size, text_tokens, chat, rendered, sha)


def _vocabulary(tok: Tokenizer):
    """(kind of a piece, bytes of a piece, vocabulary name) for this tokenizer's kind of vocabulary."""
    pieces: list[bytes] | None = tok._pieces  # noqa: SLF001 - exact bytes of each id, as decode uses them
    if pieces is not None:
        return (lambda piece, data: "byte" if not _whole_utf8(data) else "text"), \
            (lambda i, piece: pieces[i]), "byte-level BPE"
    model = type(tok._backend.model).__name__  # noqa: SLF001 - BPE, WordPiece, Unigram, WordLevel
    if tok._spm:  # noqa: SLF001 - SentencePiece spelling: '▁' for a space, <0xNN> byte-fallback pieces
        return (lambda piece, data: "byte" if _byte_token(piece) is not None else "text"), _spm_bytes, \
            f"SentencePiece {model}"
    return (lambda piece, data: "text"), (lambda i, piece: piece.removeprefix("##").encode("utf-8")), model


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _byte_token(piece: str) -> int | None:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def _spm_bytes(i: int, piece: str) -> bytes:
    b = _byte_token(piece)
    return bytes([b]) if b is not None else piece.replace("▁", " ").encode("utf-8")


# --- prompts with their control tokens marked ---------------------------------------------------------------


def marked_text(tokenizer: Tokenizer, ids: Sequence[int], *, open: str = SPECIAL_OPEN,
                close: str = SPECIAL_CLOSE) -> str:
    """The text of ``ids`` with every control token drawn as ⟨token⟩, so that a template's
    ``<|im_start|>`` (one special token) looks different from the same characters typed by a user."""
    out, run = [], []
    for i in ids:
        if i in tokenizer.special_ids:
            out.append(tokenizer.decode(run) if run else "")
            out.append(f"{open}{tokenizer.id_to_token(i)}{close}")
            run = []
        else:
            run.append(i)
    out.append(tokenizer.decode(run) if run else "")
    return "".join(out)


def marked_prompt(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """A header with the counts, :func:`marked_text` of the prompt, then a rule (for ``--show-prompt``)."""
    n_special = sum(i in tokenizer.special_ids for i in ids)
    text = marked_text(tokenizer, ids)
    like = f"{SPECIAL_OPEN}like this{SPECIAL_CLOSE}"
    head = f"── prompt: {_plural(len(ids), 'token')}, {n_special} special shown {like} ──"
    return f"{head}\n{text}\n── reply ──"  # a prompt ending in a newline shows an empty line before the rule


# --- the terminal table ------------------------------------------------------------------------------------


def visible(s: str) -> str:
    """Token text one can see: ␣ for a space, ↵ newline, ⇥ tab, ␍ carriage return, other control
    characters as \\xNN; the empty string as ''."""
    if s == "":
        return "''"
    return "".join(_WHITESPACE.get(ch) or (ch if ch.isprintable() else _escape(ch)) for ch in s)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _cell(s: str, limit: int = _MAX_CELL) -> str:
    from rich.cells import cell_len

    if cell_len(s) <= limit:
        return s
    while cell_len(s) > limit - 1:
        s = s[:-1]
    return s + "…"


def _pad(s: str, width: int, right: bool = False) -> str:
    from rich.cells import cell_len

    fill = " " * max(0, width - cell_len(s))
    return fill + s if right else s + fill


def _hex(data: bytes | None) -> str:
    if data is None:
        return ""
    shown = " ".join(f"{b:02x}" for b in data[:_MAX_BYTES])
    return shown + (" …" if len(data) > _MAX_BYTES else "")


_NOTES = {"byte": "byte: not a whole character", "unknown": "unknown: the text has no token",
          "special": "special"}


def render_tokens(report: TokenReport, *, model: str = "") -> str:
    """The report as a table: one row per token (index, id, piece, text, bytes, kind, where it came from)."""
    lines = [_summary(report, model)]
    with_origin = any(t.origin != "text" for t in report.tokens)
    head = ["#", "id", "piece", "text", "bytes", "kind"] + (["from"] if with_origin else [])
    rows = []
    for t in report.tokens:
        text = f"{SPECIAL_OPEN}{t.piece}{SPECIAL_CLOSE}" if t.kind == "special" else visible(t.text)
        row = [str(t.index), str(t.id), _cell(visible(t.piece)), _cell(text), _hex(t.data), _NOTES.get(t.kind, "")]
        rows.append(row + ([t.origin] if with_origin else []))
    lines += _table(head, rows, right={0, 1})
    lines.append(_legend(report))
    return "\n".join(lines) + "\n"


def _summary(r: TokenReport, model: str) -> str:
    who = f"{model} · " if model else ""
    first = f"{who}{r.vocabulary}, {r.vocab_size:,} tokens in the vocabulary"
    counts = f"{_plural(r.characters, 'character')}, {_plural(r.utf8_bytes, 'UTF-8 byte')}"
    if not r.chat:
        wrap = f" ({r.added} added by the tokenizer)" if r.added else ""
        return f"{first}\n{counts} -> {_plural(len(r.tokens), 'token')}{wrap}"
    specials = ", ".join(f"{piece} x{n}" for piece, n in special_counts(r).items())
    return (f"{first}\n{counts} -> {_plural(r.text_tokens, 'token')} alone\n"
            f"as one user message through the chat template: {_plural(len(r.tokens), 'token')}, "
            f"{r.message_tokens} of them the message's; the template adds {r.added}, {len(r.special)} special"
            + (f" ({specials})" if specials else ""))


def _legend(r: TokenReport) -> str:
    kinds = {t.kind for t in r.tokens}
    notes = ["␣ space, ↵ newline, ⇥ tab"]
    if "special" in kinds:
        notes.append(f"{SPECIAL_OPEN}…{SPECIAL_CLOSE} a control token (user text never becomes one)")
    if "byte" in kinds:
        notes.append("<0xNN> a byte that is only part of a UTF-8 character (byte fallback)")
    if r.vocabulary == "byte-level BPE":
        notes.append("pieces spell bytes GPT-2 style (Ġ = space, Ċ = newline)")
    return "legend: " + "; ".join(notes)


def _table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    from rich.cells import cell_len

    widths = [max([cell_len(h)] + [cell_len(r[c]) for r in rows]) for c, h in enumerate(head)]
    out = []
    for row in [head] + rows:
        cells = [_pad(v, widths[c], c in right) for c, v in enumerate(row)]
        out.append("  ".join(cells).rstrip())
    return out


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def special_counts(report: TokenReport) -> dict[str, int]:
    """How often each control token occurs, in order of first use (e.g. {"<|im_start|>": 3, "<|im_end|>": 2})."""
    counts: dict[str, int] = {}
    for t in report.special:
        counts[t.piece] = counts.get(t.piece, 0) + 1
    return counts
