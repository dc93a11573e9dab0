"""Text ↔ token ids, built on the `tokenizers` library.

Two sources, one class:

* GGUF metadata, under llama.cpp's key names: byte-level BPE (``tokenizer.ggml.model = "gpt2"``)
  and SentencePiece-style BPE (``"llama"``). ``tokenizer.ggml.pre`` picks the split regexes the
  merges were learned with; they are applied as llama.cpp applies them (a cascade of isolating
  splits), so e.g. ``"smollm"`` splits every digit off before the GPT-2 regex runs.
* A Hugging Face directory: ``tokenizer.json`` (any model `tokenizers` loads — BPE, WordPiece, …)
  plus ``tokenizer_config.json`` for the BOS/EOS/PAD names and the chat template.

Policies (RELIABILITY.md §9.4):

* Special-token text inside user input is plain text unless ``parse_special=True`` (K10, T7).
* Decoding never raises on bytes that are not UTF-8; they become U+FFFD (K5). Streaming decode
  holds back an incomplete character and emits it (or one U+FFFD) on ``flush()`` (K3, K4).
* A lone surrogate in the input is a :class:`TokenizerError`, not a Rust panic (K6).
* ``tokenizer.json``'s padding and truncation are switched off: no silent cut of user text (K8).
* Every failure of the Rust library (including ``PanicException``) becomes a TokenizerError.
"""

from __future__ import annotations

import codecs
import json
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from qkv import files
from qkv.errors import TokenizerError

__all__ = ["Tokenizer", "TokenStream", "SUPPORTED_PRE_TOKENIZERS"]

# --- split regexes (llama.cpp's llm_tokenizer_bpe table, in the form Hugging Face writes them) ---------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's fallback for a BPE vocabulary whose pre-tokenizer is "default" (or not stated).
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)


@dataclass(frozen=True)
class _PreSpec:
    """How one ``tokenizer.ggml.pre`` value splits text before BPE runs."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # llama-3 style: a whole word found in the vocab is one token


_PRE_FAMILIES: dict[_PreSpec, tuple[str, ...]] = {
    _PreSpec(_DEFAULT): ("default",),
    _PreSpec((_GPT2,)): ("gpt2", "mpt", "olmo", "jais"),
    _PreSpec(_DIGITS_THEN_GPT2): ("smollm", "starcoder", "refact", "command-r", "codeshell"),
    _PreSpec((_LLAMA3,), ignore_merges=True): ("llama-bpe", "llama3", "llama-v3"),
    _PreSpec((_QWEN2,)): ("qwen2", "stablelm2", "deepseek-r1-qwen"),
}
_PRE_TOKENIZERS: dict[str, _PreSpec] = {
    name: spec for spec, names in _PRE_FAMILIES.items() for name in names
}
SUPPORTED_PRE_TOKENIZERS: tuple[str, ...] = tuple(sorted(_PRE_TOKENIZERS))

# llama.cpp's token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_TOKEN_TYPES = range(0, 7)

# Tokens that end a turn in well-known chat formats; a control token spelled like one of these is a
# stop token even when the file names only one EOS id (llama.cpp does the same).
_END_OF_TURN = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>", "<end_of_utterance>", "<|return|>", "<|call|>", "</s>", "<EOT>",
})

_INT_TYPES = frozenset({"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"})
_FIELD_TYPES: dict[str, frozenset[str]] = {
    "tokenizer.ggml.model": frozenset({"STRING"}),
    "tokenizer.ggml.pre": frozenset({"STRING"}),
    "tokenizer.ggml.tokens": frozenset({"ARRAY[STRING]"}),
    "tokenizer.ggml.merges": frozenset({"ARRAY[STRING]"}),
    "tokenizer.ggml.scores": frozenset({"ARRAY[FLOAT32]", "ARRAY[FLOAT64]"}),
    "tokenizer.ggml.token_type": frozenset(f"ARRAY[{t}]" for t in _INT_TYPES),
    "tokenizer.ggml.add_bos_token": frozenset({"BOOL"}),
    "tokenizer.ggml.add_eos_token": frozenset({"BOOL"}),
    "tokenizer.ggml.add_space_prefix": frozenset({"BOOL"}),
    "tokenizer.chat_template": frozenset({"STRING"}),
}
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "cls": "tokenizer.ggml.cls_token_id",
}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


# --- errors ------------------------------------------------------------------------------------------


def _is_panic(exc: BaseException) -> bool:
    """pyo3's PanicException derives from BaseException, so it must be recognised by name."""
    return type(exc).__name__ == "PanicException"


@contextmanager
def _rust_errors(what: str, where: str, fix: str) -> Iterator[None]:
    """Turn any failure inside the `tokenizers` library into one TokenizerError line."""
    try:
        yield
    except TokenizerError:
        raise
    except BaseException as exc:  # noqa: BLE001 - PanicException is a BaseException
        if not isinstance(exc, Exception) and not _is_panic(exc):
            raise
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise TokenizerError(f"{what} failed in {where}: {detail}; fix: {fix}") from None


def _bad(key: str, source: str, problem: str, fix: str) -> TokenizerError:
    return TokenizerError(f"{key} in {source} {problem}; fix: {fix}")


# --- GPT-2 byte alphabet -------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The character GPT-2's byte-level BPE writes for each byte 0..255.

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to U+0100.. so that every
    byte has a visible, non-space character (space becomes 'Ġ', newline 'Ċ').
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: list[str] = [""] * 256
    for b in keep:
        chars[b] = chr(b)
    shifted = 0
    for b in range(256):
        if not chars[b]:
            chars[b] = chr(0x100 + shifted)
            shifted += 1
    return chars


_BYTE_CHARS = _byte_alphabet()


def _respell_bytes(text: str) -> str:
    """Write arbitrary text in the byte alphabet (for a vocab entry stored as plain UTF-8)."""
    return "".join(_BYTE_CHARS[b] for b in text.encode("utf-8"))


_UNSPELL = str.maketrans({c: chr(b) for b, c in enumerate(_BYTE_CHARS)})
_SPELLED = re.compile("[" + re.escape("".join(_BYTE_CHARS)) + "]*")


def _unspell_bytes(piece: str) -> bytes | None:
    """Bytes of a byte-level vocab entry, or None when it is not written in the byte alphabet."""
    if _SPELLED.fullmatch(piece) is None:
        return None
    return piece.translate(_UNSPELL).encode("latin-1")


def _unspell_all(pieces: list[str]) -> list[bytes | None]:
    """_unspell_bytes of each piece; a whole vocabulary written in the byte alphabet (every real one) in one
    check and one translation (one byte per character), not 50,000 of each."""
    joined = "".join(pieces)
    if _SPELLED.fullmatch(joined) is None:
        return [_unspell_bytes(p) for p in pieces]
    data, out, at = joined.translate(_UNSPELL).encode("latin-1"), [], 0
    for p in pieces:
        out.append(data[at:at + len(p)])
        at += len(p)
    return out


def _readable(data: bytes) -> str:
    """UTF-8 text, with bytes that are not part of a valid character shown as <0xNN>."""
    text = data.decode("utf-8", "surrogateescape")
    return _ESCAPED_BYTE.sub(lambda m: f"<0x{ord(m.group()) - 0xDC00:02X}>", text)


# --- GGUF metadata ---------------------------------------------------------------------------------------


@dataclass
class _GgufVocab:
    """The tokenizer fields of a GGUF file, checked (G14, G15)."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[tuple[str, str]] | None
    ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    pre: _PreSpec | None
    chat_template: str | None
    source: str


class _MetadataReader:
    """Typed access to a GGUF metadata dict; every problem names its key."""

    def __init__(self, metadata: Mapping[str, Any], field_types: Mapping[str, str] | None, source: str):
        if not isinstance(metadata, Mapping):
            raise TokenizerError(
                f"GGUF metadata of {source} is a {type(metadata).__name__}, not a dict; "
                "fix: pass the metadata dict of the reader"
            )
        self.metadata, self.field_types, self.source = metadata, field_types or {}, source

    def _check_type(self, key: str, expected: frozenset[str]) -> None:
        declared = self.field_types.get(key)
        if declared is not None and declared not in expected:
            raise _bad(key, self.source, f"is stored as {declared}, expected {' or '.join(sorted(expected))}",
                       "re-convert the model with a current llama.cpp convert script")

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.metadata.get(key)
        if value is None:
            if required:
                raise _bad(key, self.source, "is missing", "use a GGUF that carries its tokenizer")
            return None
        self._check_type(key, _FIELD_TYPES.get(key, frozenset({"STRING"})))
        if not isinstance(value, str):
            raise _bad(key, self.source, f"is a {type(value).__name__}, not a string", "re-convert the model")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.metadata.get(key)
        if value is None:
            return default
        self._check_type(key, _FIELD_TYPES[key])
        if not isinstance(value, bool):
            raise _bad(key, self.source, f"is a {type(value).__name__}, not a bool", "re-convert the model")
        return value

    def token_id(self, key: str, n_vocab: int) -> int | None:
        value = _python(self.metadata.get(key))
        if value is None:
            return None
        self._check_type(key, _INT_TYPES)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(key, self.source, f"is a {type(value).__name__}, not an integer", "re-convert the model")
        if not 0 <= value < n_vocab:
            raise _bad(key, self.source, f"is {value}, outside the vocabulary of {n_vocab} tokens",
                       "re-convert the model; the special-token id must index tokenizer.ggml.tokens")
        return value

    def array(self, key: str, item: type | tuple[type, ...], *, length: int | None = None) -> list | None:
        value = _python(self.metadata.get(key))
        if value is None:
            return None
        self._check_type(key, _FIELD_TYPES[key])
        if not isinstance(value, (list, tuple)):
            raise _bad(key, self.source, f"is a {type(value).__name__}, not an array", "re-convert the model")
        if length is not None and len(value) != length:
            raise _bad(key, self.source, f"has {len(value)} entries but tokenizer.ggml.tokens has {length}",
                       "re-convert the model; the arrays must be parallel")
        exact = {item} if isinstance(item, type) else set(item)
        if not set(map(type, value)) <= exact - {bool}:  # the common case in one pass; else find the entry
            for i, x in enumerate(value):
                if isinstance(x, bool) or not isinstance(x, item):
                    names = item.__name__ if isinstance(item, type) else "/".join(t.__name__ for t in item)
                    raise _bad(key, self.source, f"entry {i} is a {type(x).__name__}, not {names}",
                               "re-convert the model")
        return list(value)


def _python(value: Any) -> Any:
    """numpy arrays and scalars (what some readers return) as plain Python values."""
    if value is not None and not isinstance(value, (str, bytes, list, tuple, bool, int, float)) and \
            callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value


def _read_gguf_vocab(reader: _MetadataReader) -> _GgufVocab:
    """Collect and validate every tokenizer field a GGUF carries."""
    src = reader.source
    model = reader.string("tokenizer.ggml.model", required=True)
    if model not in ("gpt2", "llama"):
        raise _bad("tokenizer.ggml.model", src, f"is {model!r}, which qkv cannot tokenize",
                   "use a model whose tokenizer is 'gpt2' (byte-level BPE) or 'llama' (SentencePiece BPE)")
    tokens = reader.array("tokenizer.ggml.tokens", str)
    if not tokens:
        raise _bad("tokenizer.ggml.tokens", src, "is missing or empty", "use a GGUF that carries its tokenizer")
    n = len(tokens)
    types = reader.array("tokenizer.ggml.token_type", int, length=n) or [_NORMAL] * n
    bad_type = next((i for i, t in enumerate(types) if t not in _TOKEN_TYPES), None)
    if bad_type is not None:
        raise _bad("tokenizer.ggml.token_type", src, f"entry {bad_type} is {types[bad_type]}, not a token type 0..6",
                   "re-convert the model")
    scores = reader.array("tokenizer.ggml.scores", (float, int), length=n)
    merges = reader.array("tokenizer.ggml.merges", str)
    ids = {name: reader.token_id(key, n) for name, key in _ID_KEYS.items()}
    pre = _pre_spec(reader, model)
    return _GgufVocab(
        model=model, tokens=tokens, types=types,
        scores=[float(s) for s in scores] if scores is not None else None,
        merges=_parse_merges(merges, src) if merges is not None else None,
        ids={k: v for k, v in ids.items() if v is not None},
        add_bos=reader.flag("tokenizer.ggml.add_bos_token", default=model == "llama"),
        add_eos=reader.flag("tokenizer.ggml.add_eos_token", default=False),
        add_space_prefix=reader.flag("tokenizer.ggml.add_space_prefix", default=model == "llama"),
        pre=pre, chat_template=reader.string("tokenizer.chat_template"), source=src,
    )


def _pre_spec(reader: _MetadataReader, model: str) -> _PreSpec | None:
    """The split cascade for a byte-level vocabulary (SentencePiece vocabularies do not split)."""
    name = reader.string("tokenizer.ggml.pre")
    if model != "gpt2":
        return None
    name = name or "default"  # llama.cpp's choice for files written before the key existed
    spec = _PRE_TOKENIZERS.get(name)
    if spec is None:
        raise _bad("tokenizer.ggml.pre", reader.source, f"is {name!r}, a pre-tokenizer qkv does not know",
                   f"use one of: {', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    return spec


def _parse_merges(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right or " " in right:
            raise _bad("tokenizer.ggml.merges", source, f"entry {i} ({merge[:40]!r}) is not two tokens "
                       "separated by one space", "re-convert the model")
        pairs.append((left, right))
    return pairs


def _check_merges(vocab: Mapping[str, int], merges: list[tuple[str, str]], source: str) -> None:
    """Every merge must join two known tokens into a known token (tokenizers#2094 shapes)."""
    for i, (left, right) in enumerate(merges):
        for part in (left, right, left + right):
            if part not in vocab:
                raise _bad("tokenizer.ggml.merges", source,
                           f"entry {i} ({left} {right}) uses {part[:40]!r}, which is not in tokenizer.ggml.tokens",
                           "re-convert the model; merges and tokens come from different tokenizers")


def _byte_token_ids(vocab: _GgufVocab) -> dict[int, int]:
    """byte value → id of the `<0xNN>` tokens of a SentencePiece vocabulary (G15)."""
    found: dict[int, int] = {}
    for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind != _BYTE:
            continue
        match = _BYTE_TOKEN.fullmatch(text)
        if match is None:
            raise _bad("tokenizer.ggml.tokens", vocab.source, f"entry {i} ({text[:20]!r}) is typed BYTE but is "
                       "not spelled <0xNN>", "re-convert the model")
        value = int(match.group(1), 16)
        if value in found:
            raise _bad("tokenizer.ggml.tokens", vocab.source, f"has byte token <0x{value:02X}> twice "
                       f"(entries {found[value]} and {i})", "re-convert the model")
        found[value] = i
    if found and len(found) != 256:
        missing = min(set(range(256)) - set(found))
        raise _bad("tokenizer.ggml.tokens", vocab.source, f"has {len(found)} of the 256 byte tokens "
                   f"(<0x{missing:02X}> is missing)", "re-convert the model")
    return found


# --- building the `tokenizers` pipeline -------------------------------------------------------------------


def _added_tokens(vocab: _GgufVocab) -> tuple[list[AddedToken], list[AddedToken]]:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens.

    Added tokens are matched whole in the text before BPE runs; special ones only when the caller
    asks for it (parse_special), user-defined ones always — llama.cpp's rule.
    """
    special, user = [], []
    for text, kind in zip(vocab.tokens, vocab.types):
        if kind in (_CONTROL, _UNKNOWN) and text:
            special.append(AddedToken(text, special=True, normalized=False))
        elif kind == _USER_DEFINED and text:
            user.append(AddedToken(text, special=False, normalized=False))
    return special, user


def _byte_level_backend(vocab: _GgufVocab) -> tuple[tokenizers.Tokenizer, list[bytes]]:
    """GPT-2 style BPE over bytes, with the pre-tokenizer's split cascade in front."""
    pieces: list[bytes] = []
    entries: dict[str, int] = {}
    for i, (text, kind, spelled) in enumerate(zip(vocab.tokens, vocab.types, _unspell_all(vocab.tokens))):
        raw = spelled if kind in (_NORMAL, _BYTE, _UNUSED, 0) else None
        if kind in (_NORMAL, 0) and raw is None:  # stored as plain UTF-8: respell like the rest
            text, raw = _respell_bytes(text), text.encode("utf-8")
        pieces.append(raw if raw is not None else text.encode("utf-8"))
        entries[text] = i
    if vocab.merges is None:
        raise _bad("tokenizer.ggml.merges", vocab.source, "is missing", "re-convert the model")
    _check_merges(entries, vocab.merges, vocab.source)
    assert vocab.pre is not None
    with _rust_errors("building the BPE model", vocab.source, "re-convert the model"):
        backend = tokenizers.Tokenizer(models.BPE(
            vocab=entries, merges=vocab.merges, fuse_unk=False, ignore_merges=vocab.pre.ignore_merges,
        ))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in vocab.pre.splits]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
    return backend, pieces


# Deriving SentencePiece merges tries every cut of a token whose two sides have token lengths; each try
# slices and hashes both sides. A real vocabulary needs ~1e8 units (Gemma's 262k tokens: ~6e7).
_MERGE_WORK_LIMIT = 400_000_000
_MAX_TOKEN_LENGTHS = 4096  # distinct token lengths (real vocabularies: a few hundred)


def _cuts_by_length(lengths: list[int]) -> dict[int, tuple[int, ...]]:
    """For each token length L: the cuts c (0 < c < L) where both c and L - c are token lengths.

    Only such a cut can split a token into two tokens, so a single very long token costs nothing:
    no other token is long enough to be one side of it.
    """
    import numpy as np

    a = np.asarray(lengths, dtype=np.int64)
    present = np.zeros(int(a.max()) + 1, dtype=bool)
    present[a] = True
    out = {}
    for length in lengths:
        c = a[(a > 0) & (a < length)]
        out[length] = tuple(int(x) for x in c[present[length - c]])
    return out


def _score_merges(vocab: _GgufVocab, entries: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges a SentencePiece vocabulary implies: any split of a token into two known tokens,
    ranked by the token's score (highest first) — the pair llama.cpp's SPM merges first.

    Linear in the vocabulary for real files: only cuts whose two sides have lengths some token has are
    tried; a vocabulary that would still need more than ``_MERGE_WORK_LIMIT`` units is refused.
    """
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    eligible = [(text, i) for text, i in entries.items() if vocab.types[i] in (_NORMAL, _USER_DEFINED, 0)]
    lengths = sorted({len(text) for text in entries})
    if len(lengths) > _MAX_TOKEN_LENGTHS:
        raise _bad("tokenizer.ggml.tokens", vocab.source, f"has tokens of {len(lengths)} different lengths (at most "
                   f"{_MAX_TOKEN_LENGTHS} without tokenizer.ggml.merges)", "re-convert the model with its merges")
    cuts = _cuts_by_length(lengths) if lengths else {}
    work = sum(len(cuts[len(text)]) * (len(text) + 64) for text, _ in eligible)
    if work > _MERGE_WORK_LIMIT:
        raise _bad("tokenizer.ggml.tokens", vocab.source, f"would need {work:,} steps to derive merges from scores "
                   f"(limit {_MERGE_WORK_LIMIT:,})", "re-convert the model with its tokenizer.ggml.merges")
    ranked = []
    for text, i in eligible:
        for cut in cuts[len(text)]:
            left, right = text[:cut], text[cut:]
            if left in entries and right in entries:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_backend(vocab: _GgufVocab) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE: '▁' for spaces, merges from scores, <0xNN> byte fallback."""
    bytes_found = _byte_token_ids(vocab)
    entries = {text: i for i, text in enumerate(vocab.tokens)}
    merges = vocab.merges if vocab.merges is not None else _score_merges(vocab, entries)
    if vocab.merges is not None:
        _check_merges(entries, merges, vocab.source)
    unk = vocab.ids.get("unk")
    prepend = "first" if vocab.add_space_prefix else "never"
    with _rust_errors("building the SentencePiece model", vocab.source, "re-convert the model"):
        backend = tokenizers.Tokenizer(models.BPE(
            vocab=entries, merges=merges, fuse_unk=True, byte_fallback=bool(bytes_found),
            unk_token=vocab.tokens[unk] if unk is not None else None,
        ))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if vocab.add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
    return backend


# --- Hugging Face directories ------------------------------------------------------------------------------

def _read_json(path: Path, *, required: bool, limit: int = files.MAX_CONFIG_BYTES) -> dict | None:
    """A JSON object from a file of the model directory, or None when it is absent and optional.

    Size- and nesting-limited, regular files only, and a symlink must stay inside the directory
    (qkv.files); every failure is a TokenizerError naming the file.
    """
    found = files.inside(path.parent, path.name, what=path.name, error=TokenizerError, required=False)
    if found is None:
        if required:
            raise TokenizerError(f"{path.name} is missing in {path.parent}; fix: point at a directory with a "
                                 "Hugging Face tokenizer (tokenizer.json)")
        return None
    value = files.read_json(found, what=path.name, limit=limit, error=TokenizerError)
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} holds a {type(value).__name__}, not a JSON object; fix: re-download it")
    return value


def _named_token(backend: tokenizers.Tokenizer, config: Mapping[str, Any], key: str, where: Path) -> int | None:
    """Id of a token that tokenizer_config.json names (as a string or {"content": ...})."""
    value = config.get(key)
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenizerError(f"{key} in {where} is a {type(value).__name__}, not a token string; fix: correct it")
    token_id = backend.token_to_id(value)
    if token_id is None:
        raise TokenizerError(f"{key} {value!r} in {where} is not in the vocabulary; fix: correct {key}")
    return token_id


def _generation_eos(path: Path, vocab_size: int) -> list[int]:
    """Extra stop ids from generation_config.json (an int or a list of ints)."""
    config = _read_json(path, required=False) or {}
    value = config.get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise TokenizerError(f"eos_token_id {v!r} in {path} is not a token id below {vocab_size}; "
                                 "fix: correct generation_config.json")
    return values


def _byte_pieces(backend: tokenizers.Tokenizer, decoder: Mapping[str, Any] | None) -> list[bytes] | None:
    """Exact bytes of every id when tokenizer.json is byte-level BPE; None for any other decoder."""
    if not decoder or decoder.get("type") != "ByteLevel":
        return None
    added = backend.get_added_tokens_decoder()
    pieces = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        if i in added:
            pieces.append(added[i].content.encode("utf-8"))
            continue
        token = backend.id_to_token(i)
        raw = _unspell_bytes(token) if token is not None else b""
        if raw is None:
            return None
        pieces.append(raw)
    return pieces


def _hf_chat_template(config: Mapping[str, Any], path: Path) -> str | None:
    """The default chat template: tokenizer_config.json's, or chat_template.jinja beside it."""
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value
                 if isinstance(t, Mapping) and isinstance(t.get("name"), str)}
        value = named.get("default")
    if isinstance(value, str):
        return value
    jinja = files.inside(path, "chat_template.jinja", what="chat template", error=TokenizerError, required=False)
    if jinja is not None:
        return files.read_text(jinja, what="chat template", limit=files.MAX_TEMPLATE_BYTES, error=TokenizerError)
    return None


def _load_hf_dir(cls: type[Tokenizer], path: Path) -> Tokenizer:
    """Tokenizer from tokenizer.json, with names and flags from the configs next to it."""
    if not path.is_dir():
        raise TokenizerError(f"{path} is not a directory; fix: pass the model directory holding tokenizer.json")
    where = path / "tokenizer.json"
    spec = _read_json(where, required=True, limit=files.MAX_TOKENIZER_JSON_BYTES)
    assert spec is not None
    _check_regexes(spec, str(where))  # before the Rust library compiles them
    with _rust_errors("loading", str(where), "re-download tokenizer.json or upgrade the tokenizers library"):
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        backend.no_padding()  # a padded or truncated prompt would silently change the user's text
        backend.no_truncation()
    for part in ("normalizer", "decoder"):
        _check_amplification(spec.get(part), f"{part} of {where}")
    cfg_path = path / "tokenizer_config.json"
    config = {**(_read_json(path / "special_tokens_map.json", required=False) or {}),
              **(_read_json(cfg_path, required=False, limit=files.MAX_TOKENIZER_CONFIG_BYTES) or {})}
    ids = {k: _named_token(backend, config, f"{k}_token", cfg_path) for k in ("bos", "eos", "pad", "unk")}
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    special = {i for i, t in added.items() if t.special}
    named = [i for i in [ids["eos"], *_generation_eos(path / "generation_config.json", vocab_size)] if i is not None]
    stops = named + sorted(i for i in special if added[i].content in _END_OF_TURN and i not in named)
    specials = _Specials(
        bos=ids["bos"], eos=ids["eos"], eos_ids=tuple(dict.fromkeys(stops)), pad=ids["pad"], unk=ids["unk"],
        special_ids=frozenset(special),
    )
    add_bos = config.get("add_bos_token")
    decoder, pre = spec.get("decoder"), spec.get("pre_tokenizer")
    metaspace = pre if isinstance(pre, Mapping) and pre.get("type") == "Metaspace" else None
    return cls(backend, specials, source=str(path), pieces=_byte_pieces(backend, decoder),
               add_bos=add_bos if isinstance(add_bos, bool) else None, chat_template=_hf_chat_template(config, path),
               spm="▁" in json.dumps(decoder or {}, ensure_ascii=False),
               continuation=_metaspace_continuation(metaspace) if metaspace else None)


_MAX_REPLACEMENT = 16  # characters a Replace step may put in place of one match (real files: 1-2)
_MAX_REPEAT = 1000  # a counted repetition {n,m} in a tokenizer regex (real files: {1,3})
_COUNTED = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _check_regexes(spec: Any, where: str, depth: int = 0) -> None:
    """Refuse a regex (a ``{"Regex": ...}`` pattern anywhere in tokenizer.json) with a counted repetition
    above _MAX_REPEAT: the regex engine expands it when compiling (``a{100000}``: seconds, before any text)."""
    if depth > 64:
        return  # the JSON reader limits nesting; nothing deeper is reached here
    if isinstance(spec, Mapping):
        rx = spec.get("Regex")
        if isinstance(rx, str):
            for m in _COUNTED.finditer(rx):
                n = max(int(m.group(1)), int(m.group(2) or 0))
                if n > _MAX_REPEAT:
                    raise TokenizerError(f"{where}: a regex repeats a pattern {n} times ({m.group(0)!s:.40}; at most "
                                         f"{_MAX_REPEAT}); fix: re-download tokenizer.json")
        for v in spec.values():
            _check_regexes(v, where, depth + 1)
    elif isinstance(spec, list):
        for v in spec:
            _check_regexes(v, where, depth + 1)


def _check_amplification(step: Any, where: str) -> None:
    """Refuse a Replace normalizer/decoder step that writes a long string for every match: text would
    grow by that factor inside the Rust library (and its alignment tables by 16 bytes per byte)."""
    if not isinstance(step, Mapping):
        return
    for inner in step.get("normalizers") or step.get("decoders") or ():
        _check_amplification(inner, where)
    if step.get("type") == "Replace":
        content, pattern = step.get("content"), (step.get("pattern") or {}).get("String")
        if isinstance(content, str) and len(content) > _MAX_REPLACEMENT and \
                len(content) > (len(pattern) if isinstance(pattern, str) else 0):
            raise TokenizerError(f"{where}: a Replace step writes {len(content)} characters for each match (at most "
                                 f"{_MAX_REPLACEMENT}); text would grow without bound; fix: re-download tokenizer.json")


def _metaspace_continuation(spec: Mapping[str, Any]) -> pre_tokenizers.PreTokenizer:
    """The same Metaspace, minus the '▁' it puts before the first word of a text."""
    return pre_tokenizers.Metaspace(replacement=spec.get("replacement", "▁"), prepend_scheme="never",
                                    split=bool(spec.get("split", True)))


def byte_level_metadata() -> dict[str, Any]:
    """GGUF tokenizer fields of :meth:`Tokenizer.byte_level` (byte i is token i)."""
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [*_BYTE_CHARS, "<|bos|>", "<|eos|>"],
        "tokenizer.ggml.token_type": [_NORMAL] * 256 + [_CONTROL, _CONTROL],
        "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257,
        "tokenizer.ggml.add_bos_token": False,
    }


def _split_regex(step: Mapping[str, Any] | None) -> str | None:
    """The regex one tokenizer.json pre-tokenizer step isolates, in llama.cpp's terms (None: not a split)."""
    kind = (step or {}).get("type")
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return (step.get("pattern") or {}).get("Regex")
    if kind == "Digits" and step.get("individual_digits"):
        return r"\p{N}"
    return None


def _gguf_pre_name(pre: Mapping[str, Any] | None, ignore_merges: bool) -> str | None:
    """The ``tokenizer.ggml.pre`` whose split cascade equals a tokenizer.json byte-level pre-tokenizer."""
    steps = list(pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre]
    last = steps[-1] or {}
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    splits = [_split_regex(s) for s in steps[:-1]] + ([_GPT2] if last.get("use_regex", True) else [])
    if None in splits:
        return None
    spec = _PreSpec(tuple(splits), ignore_merges=ignore_merges)
    return next((names[0] for family, names in _PRE_FAMILIES.items() if family == spec), None)


def _hf_gguf_metadata(tok: Tokenizer) -> dict[str, Any]:
    """GGUF fields of a byte-level BPE tokenizer.json (GPT-2 byte spelling, merges as "a b")."""
    spec = json.loads(tok._backend.to_str())  # noqa: SLF001
    model = spec.get("model") or {}
    fix = "fix: export it as a Hugging Face directory instead"
    extras = ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "dropout")
    if model.get("type") != "BPE" or any(model.get(k) for k in extras) or spec.get("normalizer") \
            or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerError(f"{tok.source} is not a plain byte-level BPE tokenizer, the kind GGUF metadata "
                             f"can describe; {fix}")
    pre = _gguf_pre_name(spec.get("pre_tokenizer"), bool(model.get("ignore_merges")))
    if pre is None:
        raise TokenizerError(f"{tok.source}: its pre-tokenizer splits text unlike any llama.cpp pre-tokenizer "
                             f"({', '.join(SUPPORTED_PRE_TOKENIZERS)}); {fix}")
    added = tok._backend.get_added_tokens_decoder()  # noqa: SLF001
    if any(t.lstrip or t.rstrip or t.single_word for t in added.values()):
        raise TokenizerError(f"{tok.source} has added tokens with lstrip/rstrip/single_word, which GGUF "
                             f"cannot express; {fix}")
    add_bos, add_eos = tok._auto_wrap()  # noqa: SLF001
    types = [(_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL
             for i in range(tok.vocab_size)]
    ids = {_ID_KEYS[k]: getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad", "unk")}
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [tok.id_to_token(i) for i in range(tok.vocab_size)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
        **{k: v for k, v in ids.items() if v is not None},
        "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": add_eos,
    }


# --- the tokenizer ----------------------------------------------------------------------------------------


@dataclass
class _Specials:
    """Ids the rest of qkv needs by name."""

    bos: int | None = None
    eos: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad: int | None = None
    unk: int | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)


class Tokenizer:
    """Encode and decode text for one model; see the module docstring for the policies."""

    def __init__(self, backend: tokenizers.Tokenizer, specials: _Specials, *, source: str,
                 pieces: list[bytes] | None = None, add_bos: bool | None = None,
                 chat_template: str | None = None, spm: bool = False,
                 continuation: pre_tokenizers.PreTokenizer | None = None,
                 wrap: tuple[int | None, int | None] = (None, None)) -> None:
        """Use :meth:`from_gguf_metadata` or :meth:`from_hf_dir`; this wires already-checked parts.

        ``pieces``: the bytes of every id (byte-level vocabularies decode exactly from these).
        ``spm``: tokens spell spaces as '▁' (for :meth:`token_strings`). ``continuation``: the
        pre-tokenizer for text that continues a text, when the normal one adds a '▁' prefix.
        ``wrap``: ids put before/after the text when encoding with ``add_special`` (GGUF's
        add_bos_token/add_eos_token; a tokenizer.json brings its own post-processor instead).
        """
        self._backend = backend
        self._specials = specials
        self._pieces = pieces
        self._add_bos_default = add_bos
        self._spm = spm
        self._continuation = continuation
        self._wrap_ids = wrap
        self._lock = threading.Lock()  # encode_special_tokens is a setting of the shared backend
        self.source = source
        self.chat_template = chat_template
        self.gguf_metadata: dict[str, Any] | None = None  # the tokenizer.ggml.* fields it was built from
        self._vocab_size = len(pieces) if pieces is not None else backend.get_vocab_size(with_added_tokens=True)
        # Bytes a byte-level vocabulary has no token for (SmolLM2 lacks e.g. 0x04): BPE would drop them.
        self._kept_bytes = bytes(b for b in range(256) if backend.token_to_id(_BYTE_CHARS[b]) is not None) \
            if pieces is not None else bytes(range(256))
        added = backend.get_added_tokens_decoder()
        self._special_strings = tuple(sorted({t.content for t in added.values() if t.special},
                                             key=lambda s: (-len(s), s)))

    # -- construction --

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], field_types: Mapping[str, str] | None = None,
                           *, source: str = "file.gguf") -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its metadata (Python values, arrays as lists).

        ``field_types`` maps a key to its stored GGUF type ("ARRAY[FLOAT32]", "UINT32", …); when
        given it is checked, so that e.g. scores stored as UINT8 fail by name instead of loading.
        """
        vocab = _read_gguf_vocab(_MetadataReader(metadata, field_types, source))
        special, user = _added_tokens(vocab)
        pieces = None
        if vocab.model == "gpt2":
            backend, pieces = _byte_level_backend(vocab)
        else:
            backend = _sentencepiece_backend(vocab)
        ids = vocab.ids
        if vocab.add_bos and "bos" not in ids:
            raise _bad("tokenizer.ggml.add_bos_token", source, "is true but no bos_token_id is set",
                       "re-convert the model")
        if vocab.add_eos and "eos" not in ids:
            raise _bad("tokenizer.ggml.add_eos_token", source, "is true but no eos_token_id is set",
                       "re-convert the model")
        with _rust_errors("adding special tokens", source, "re-convert the model"):
            backend.add_special_tokens(special)
            backend.add_tokens(user)
        control = {i for i, t in enumerate(vocab.types) if t in (_CONTROL, _UNKNOWN)}
        named = [ids[k] for k in ("eos", "eot", "eom") if k in ids]
        stops = named + sorted(i for i in control if vocab.tokens[i] in _END_OF_TURN and i not in named)
        specials = _Specials(
            bos=ids.get("bos"), eos=ids.get("eos"), eos_ids=tuple(dict.fromkeys(stops)), pad=ids.get("pad"),
            unk=ids.get("unk"), special_ids=frozenset(control),
        )
        spm = vocab.model == "llama"
        wrap = (ids.get("bos") if vocab.add_bos else None, ids.get("eos") if vocab.add_eos else None)
        tok = cls(backend, specials, source=source, pieces=pieces, chat_template=vocab.chat_template, spm=spm,
                  continuation=_metaspace_continuation({"replacement": "▁", "split": False}) if spm else None,
                  wrap=wrap)
        # kept so that an exported GGUF carries exactly these fields (scores, token types, pre, …)
        tok.gguf_metadata = {k: _python(v) for k, v in metadata.items() if k.startswith("tokenizer.ggml.")}
        return tok

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A vocabulary of the 256 bytes plus ``<|bos|>`` (256) and ``<|eos|>`` (257), no merges.

        For language models trained from scratch on any text: every UTF-8 string encodes, one id per
        byte. Built through the GGUF metadata path, so :func:`byte_level_metadata` is also what an
        exported GGUF file carries.
        """
        return cls.from_gguf_metadata(byte_level_metadata(), source="byte-level")

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``generation_config.json``) from a directory."""
        return _load_hf_dir(cls, Path(path))

    # -- export --

    def to_gguf_metadata(self) -> dict[str, Any]:
        """The ``tokenizer.ggml.*`` fields that rebuild this tokenizer from a GGUF file.

        A tokenizer read from GGUF gives back the fields it was built from (exact, whatever its kind);
        one from tokenizer.json is translated when it is byte-level BPE whose splitting is one of
        llama.cpp's pre-tokenizers. Anything else is a TokenizerError, never a file that tokenizes
        differently.
        """
        if self.gguf_metadata is not None:
            return dict(self.gguf_metadata)
        return _hf_gguf_metadata(self)

    def to_hf_json(self) -> tuple[str, dict[str, Any]]:
        """``tokenizer.json`` text and ``tokenizer_config.json`` fields that rebuild this tokenizer with
        :meth:`from_hf_dir` (the chat template is the caller's to add).

        A GGUF add_eos_token becomes a post-processor in tokenizer.json; a GGUF add_bos_token becomes
        the add_bos_token flag, which qkv applies itself.
        """
        backend = self._backend
        head, tail = self._wrap_ids
        if tail is not None:
            backend = tokenizers.Tokenizer.from_str(backend.to_str())
            eos = self.id_to_token(tail)
            backend.post_processor = processors.TemplateProcessing(
                single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, tail)])
        name = lambda i: None if i is None else self.id_to_token(i)  # noqa: E731
        config = {f"{k}_token": name(getattr(self, f"{k}_id")) for k in ("bos", "eos", "pad", "unk")}
        add_bos = True if head is not None and head == self.bos_id else self._add_bos_default
        config = {k: v for k, v in config.items() if v is not None}
        if add_bos is not None:
            config["add_bos_token"] = add_bos
        return backend.to_str(), config

    def _auto_wrap(self) -> tuple[bool, bool]:
        """Whether :meth:`encode` puts a BOS / an EOS around any text by itself (GGUF's add_*_token)."""
        body, full = self.encode("a", add_special=False), self.encode("a")
        bos = self.bos_id is not None and full[:1] == [self.bos_id] and body[:1] != [self.bos_id]
        eos = self.eos_id is not None and full[-1:] == [self.eos_id] and body[-1:] != [self.eos_id]
        if full != [self.bos_id] * bos + body + [self.eos_id] * eos:
            raise TokenizerError(f"{self.source} wraps text in tokens other than BOS/EOS ({full} around {body}), "
                                 "which GGUF cannot express; fix: export it as a Hugging Face directory")
        return bos, eos

    # -- properties --

    @property
    def bos_id(self) -> int | None:
        return self._specials.bos

    @property
    def eos_id(self) -> int | None:
        """The EOS the file names (``eos_ids`` adds the other end-of-turn tokens)."""
        return self._specials.eos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS, EOT/EOM, and known end-of-turn control tokens."""
        return self._specials.eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._specials.pad

    @property
    def unk_id(self) -> int | None:
        return self._specials.unk

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Control (special) tokens: what ``skip_special`` drops and user text may never produce.

        A named id (PAD, even BOS/EOS) that points at an ordinary token is not in this set: some
        files use e.g. "!" as padding, and that must stay text.
        """
        return self._specials.special_ids

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Text of the special tokens, longest first (what the chat encoder must neutralise in user text)."""
        return self._special_strings

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of an id, as stored (byte-level 'Ġ' spelling kept)."""
        i = self._check_id(i)
        token = self._backend.id_to_token(i)
        if token is None:
            raise TokenizerError(f"token id {i} has no entry in {self.source}; fix: use an id below {self.vocab_size}")
        return token

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None when there is none."""
        if not isinstance(token, str):
            raise TokenizerError(f"token_to_id expects a str, got {type(token).__name__}; fix: pass a token string")
        return self._backend.token_to_id(token)

    # -- encoding --

    def encode(self, text: str, *, add_bos: bool | None = None, add_special: bool = True,
               parse_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` applies the tokenizer's own wrapping (GGUF: BOS/EOS per add_bos_token/
        add_eos_token; tokenizer.json: its post-processor, e.g. BERT's [CLS] … [SEP]).
        ``add_bos`` overrides only the BOS: True guarantees one leading BOS, False removes the one
        the wrapping would add. ``parse_special`` lets special-token text in ``text`` become the
        special token; by default it is encoded as the plain characters it is made of.
        """
        text = self._check_text(text)
        with self._lock, _rust_errors("encoding", self.source, "report the input that triggers it"):
            self._set_parse_special(parse_special)
            enc = self._backend.encode(text, add_special_tokens=add_special)
        ids, mask = enc.ids, enc.special_tokens_mask
        added_bos = bool(ids) and ids[0] == self.bos_id and mask[0] == 1
        head, tail = self._wrap_ids
        if add_special and (head is not None or tail is not None):
            ids = [*([head] if head is not None else []), *ids, *([tail] if tail is not None else [])]
            added_bos = head is not None and head == self.bos_id
        if add_bos is None:
            add_bos = self._add_bos_default if add_special else None
        return self._override_bos(ids, add_bos, added_bos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """What :meth:`encode` gives (default options), plus each token's [start, end) character span
        in ``text`` and whether it is a special token — for showing tokens and grouping them into words."""
        ids = self.encode(text)
        with self._lock, _rust_errors("encoding", self.source, "report the input that triggers it"):
            self._set_parse_special(False)
            enc = self._backend.encode(text, add_special_tokens=True)
        offsets, special = [tuple(o) for o in enc.offsets], [bool(m) for m in enc.special_tokens_mask]
        if ids[:1] == [self.bos_id] and enc.ids[:1] != [self.bos_id]:
            offsets, special = [(0, 0), *offsets], [True, *special]
        elif enc.ids[:1] == [self.bos_id] and ids[:1] != [self.bos_id]:
            offsets, special = offsets[1:], special[1:]
        if len(offsets) != len(ids):
            raise TokenizerError(f"{self.source}: token offsets do not line up with the ids; fix: report the text")
        return ids, offsets, special

    def encode_segments(self, segments: Sequence[tuple[str, bool]], *, add_bos: bool = False) -> list[int]:
        """Encode consecutive pieces of one text, each with its own ``parse_special`` flag.

        The chat encoder uses this so that a template's own markers become special tokens while
        the same text typed by a user does not (T7). No post-processing: a chat template writes its
        own BOS, as Hugging Face's ``apply_chat_template`` assumes; ``add_bos=True`` adds one.
        """
        ids: list[int] = []
        started = False
        for text, parse_special in segments:
            text = self._check_text(text)
            if not text:
                continue
            with self._lock, _rust_errors("encoding", self.source, "report the input that triggers it"):
                self._set_parse_special(parse_special)
                ids += self._encode_continuation(text) if started else \
                    self._backend.encode(text, add_special_tokens=False).ids
            started = True
        return self._override_bos(ids, add_bos, added_bos=False)

    def _set_parse_special(self, parse_special: bool) -> None:
        """encode_special_tokens is a setting of the shared backend: set it under the lock."""
        if self._backend.encode_special_tokens == parse_special:
            self._backend.encode_special_tokens = not parse_special

    def _check_text(self, text: object) -> str:
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode is a {type(text).__name__}, not a str; fix: pass a str")
        bad = _SURROGATE.search(text)
        if bad is not None:
            raise TokenizerError(
                f"text contains a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()}; "
                "fix: repair the input, e.g. s.encode('utf-8', 'replace').decode('utf-8')"
            )
        if self._pieces is not None and len(self._kept_bytes) < 256:
            self._check_bytes(text)
        return text

    def _check_bytes(self, text: str) -> None:
        """Refuse text with a byte the vocabulary cannot express, instead of dropping it silently."""
        data = text.encode("utf-8")
        lost = data.translate(None, self._kept_bytes)
        if lost:
            at = len(data[:data.index(lost[0])].decode("utf-8", "ignore"))
            raise TokenizerError(
                f"character U+{ord(text[at]):04X} at index {at} has no token in {self.source} (byte 0x{lost[0]:02X} "
                "is missing from its vocabulary); fix: remove or replace that character"
            )

    def _encode_continuation(self, text: str) -> list[int]:
        """A SentencePiece piece in the middle of a text gets no '▁' prefix: it is not the start."""
        backend = self._backend
        if self._continuation is None:
            return backend.encode(text, add_special_tokens=False).ids
        saved = backend.pre_tokenizer
        backend.pre_tokenizer = self._continuation
        try:
            return backend.encode(text, add_special_tokens=False).ids
        finally:
            backend.pre_tokenizer = saved

    def _override_bos(self, ids: list[int], add_bos: bool | None, added_bos: bool) -> list[int]:
        if add_bos is True and not added_bos:
            if self.bos_id is None:
                raise TokenizerError(f"add_bos=True but {self.source} declares no BOS token; fix: pass add_bos=False")
            return [self.bos_id, *ids]
        if add_bos is False and added_bos:
            return ids[1:]
        return ids

    # -- decoding --

    def _check_id(self, i: object) -> int:
        if isinstance(i, bool):
            raise TokenizerError(f"token id {i!r} is a bool, not an integer; fix: pass ints")
        try:
            value = int(i.__index__())  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            raise TokenizerError(f"token id {i!r} is not an integer; fix: pass ints") from None
        if not 0 <= value < self._vocab_size:
            raise TokenizerError(
                f"token id {value} is outside the vocabulary of {self.source} (0..{self._vocab_size - 1}); "
                "fix: use ids this tokenizer produced"
            )
        return value

    def _checked_ids(self, ids: Iterable[object]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TokenizerError("ids must be a sequence of ints, not a string; fix: pass a list of token ids")
        return [self._check_id(i) for i in ids]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``. Bytes that do not form UTF-8 become U+FFFD; this never raises for valid ids."""
        checked = self._checked_ids(ids)
        if skip_special:
            checked = [i for i in checked if i not in self.special_ids]
        if self._pieces is not None:
            return b"".join(self._pieces[i] for i in checked).decode("utf-8", "replace")
        with _rust_errors("decoding", self.source, "report the ids that trigger it"):
            return self._backend.decode(checked, skip_special_tokens=False)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """One readable string per id, for showing tokens: spaces as spaces, partial UTF-8 as <0xNN>."""
        checked = self._checked_ids(ids)
        if self._pieces is not None:
            return [_readable(self._pieces[i]) for i in checked]
        out = []
        for i in checked:
            token = self.id_to_token(i)
            if self._spm and i not in self.special_ids:
                token = token.replace("▁", " ")
            out.append(token)
        return out

    def stream(self, *, skip_special: bool = False) -> TokenStream:
        """A decoder fed one id at a time that only ever emits complete characters."""
        if self._pieces is not None:
            return _ByteStream(self, skip_special)
        return _WindowStream(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids})")


# --- streaming --------------------------------------------------------------------------------------------


class TokenStream(ABC):
    """Incremental decoding: ``push(id)`` returns the new complete text, ``flush()`` the rest.

    ``''.join(pushes) + flush()`` equals ``decode(all ids)``; a stream cut inside a character
    flushes one U+FFFD for it.
    """

    @abstractmethod
    def push(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often '' while a character is partial)."""

    @abstractmethod
    def flush(self) -> str:
        """End of stream: whatever is held back, an incomplete character as one U+FFFD."""


class _ByteStream(TokenStream):
    """Byte-level vocabularies: the exact bytes of each token through an incremental UTF-8 decoder."""

    def __init__(self, tok: Tokenizer, skip_special: bool) -> None:
        self._tok, self._skip = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        i = self._tok._check_id(token_id)  # noqa: SLF001
        if self._skip and i in self._tok.special_ids:
            return ""
        return self._utf8.decode(self._tok._pieces[i])  # type: ignore[index]  # noqa: SLF001

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _WindowStream(TokenStream):
    """Other vocabularies: decode a short window and emit what it adds once it ends cleanly.

    The window starts one emission back so that decoders which look at neighbours (WordPiece's
    '##', SentencePiece's leading-space strip) see the same context as a whole decode.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool) -> None:
        self._tok, self._skip = tok, skip_special
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def _delta(self) -> str:
        window = self._tok.decode(self._ids[self._prefix:], skip_special=self._skip)
        done = self._tok.decode(self._ids[self._prefix:self._read], skip_special=self._skip)
        return window[len(done):]

    def push(self, token_id: int) -> str:
        self._ids.append(self._tok._check_id(token_id))  # noqa: SLF001
        new = self._delta()
        if not new or new.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def flush(self) -> str:
        new = self._delta()
        self._prefix, self._read = self._read, len(self._ids)
        return new
