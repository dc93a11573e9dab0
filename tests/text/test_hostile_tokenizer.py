"""Tokenizers built from hostile files (issue #16): bounded time to build, typed errors.

A SentencePiece-style GGUF vocabulary without merges derives them from scores; that used to try every cut
of every token (quadratic in a token's length: one 300,000-character token took 16 s+)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fuzz.seeds import spm_vocab
from qkv.errors import TokenizerError
from qkv.text.tokenizer import Tokenizer, _score_merges


def spm_metadata(extra_tokens: list[str] = ()) -> dict[str, Any]:
    meta = {k: v for k, (_, v) in spm_vocab().items()}
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + list(extra_tokens)
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1] * len(extra_tokens)
    meta["tokenizer.ggml.scores"] = meta["tokenizer.ggml.scores"] + [-1000.0] * len(extra_tokens)
    return meta


def quadratic_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """The old derivation, every cut of every token: the reference the fast one must equal."""
    entries = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for text, i in entries.items():
        if types[i] not in (1, 4, 0):
            continue
        for cut in range(1, len(text)):
            if text[:cut] in entries and text[cut:] in entries:
                ranked.append((-scores[i], i, cut, text[:cut], text[cut:]))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


@pytest.mark.parametrize("length", [300_000, 1_000_000])
def test_one_very_long_token_builds_fast(length: int) -> None:
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(spm_metadata(["a" * length]), source="long.gguf")
    assert time.perf_counter() - start < 1.0
    assert tok.decode(tok.encode("the cat"), skip_special=True) == "the cat"


def test_derived_merges_equal_the_exhaustive_derivation() -> None:
    extra = ["▁thequick", "thequ", "ick", "▁the▁the", "ab" * 20, "ab" * 10, "x" * 33, "▁"]
    meta = spm_metadata(extra)
    from qkv.text.tokenizer import _MetadataReader, _read_gguf_vocab

    vocab = _read_gguf_vocab(_MetadataReader(meta, None, "t.gguf"))
    entries = {t: i for i, t in enumerate(vocab.tokens)}
    expected = quadratic_merges(vocab.tokens, vocab.types, vocab.scores)
    assert len(expected) > 100
    assert _score_merges(vocab, entries) == expected


def test_a_vocabulary_of_every_length_is_refused_typed() -> None:
    """Tokens of thousands of different lengths would still cost length x lengths: refused by name."""
    extra = ["q" * n for n in range(1, 5000)]
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match="different lengths"):
        Tokenizer.from_gguf_metadata(spm_metadata(extra), source="lengths.gguf")
    assert time.perf_counter() - start < 1.0


def test_an_amplifying_replace_step_is_refused(tmp_path: Any) -> None:
    """A tokenizer.json normalizer that writes 1000 characters for every 'a' would turn a 10 kB prompt into
    10 MB inside the Rust library (and its alignment tables into 160 MB): refused when the file is read."""
    import json
    import shutil

    from fuzz.seeds import bpe_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    bpe_tokenizer().save(str(d / "tokenizer.json"))
    spec = json.loads((d / "tokenizer.json").read_text())
    for part, step in (("normalizer", {"type": "Replace", "pattern": {"String": "a"}, "content": "a" * 1000}),
                       ("decoder", {"type": "Sequence", "decoders": [
                           {"type": "Replace", "pattern": {"Regex": "."}, "content": "b" * 100}]})):
        bad = {**spec, part: step}
        (d / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(TokenizerError, match="Replace step writes"):
            Tokenizer.from_hf_dir(d)
    (d / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {
        "type": "Replace", "pattern": {"String": " "}, "content": "▁"}}))
    assert Tokenizer.from_hf_dir(d).encode("a b")  # the common one-character replacement loads
    shutil.rmtree(d)


def _tok_dir(tmp_path: Any) -> Any:
    from fuzz.seeds import bpe_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    bpe_tokenizer().save(str(d / "tokenizer.json"))
    return d


def test_a_regex_with_a_huge_counted_repetition_is_refused_before_compiling(tmp_path: Any) -> None:
    """Fuzz case tokenizer 5003 (seed 0): a Split regex 'a{100000}' took the regex engine 2.4 s to compile."""
    import json

    d = _tok_dir(tmp_path)
    spec = json.loads((d / "tokenizer.json").read_text())
    for rx in ("a{100000}", "(ab){2,50000}", "x{3,}y{1001}"):
        bad = {**spec, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}]}}
        (d / "tokenizer.json").write_text(json.dumps(bad))
        start = time.perf_counter()
        with pytest.raises(TokenizerError, match="repeats a pattern"):
            Tokenizer.from_hf_dir(d)
        assert time.perf_counter() - start < 0.5
    ok = {**spec, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}| ?\{x\}"},
                                    "behavior": "Isolated", "invert": False}}
    (d / "tokenizer.json").write_text(json.dumps(ok))
    assert Tokenizer.from_hf_dir(d).encode("12345 {x}")  # GPT-4-style digit groups and escaped braces load


def test_named_chat_templates_with_odd_names_are_skipped_not_crashing(tmp_path: Any) -> None:
    """Fuzz case tokenizer 8980 (seed 0): a chat_template list whose 'name' was a list raised TypeError."""
    import json

    d = _tok_dir(tmp_path)
    templates = [{"name": ["default"], "template": "x"}, {"name": "default", "template": "{{ 'ok' }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert Tokenizer.from_hf_dir(d).chat_template == "{{ 'ok' }}"
