"""``qkv generate --show-prompt`` and ``qkv chat --show-prompt`` on the real SmolLM2: the prompt the model reads,
printed to standard error before the reply, with every control token drawn ⟨like this⟩ — the same text
transformers' apply_chat_template renders, the same control tokens as its token ids — while special-token
text typed by the user stays unmarked (T7). One or two new tokens keep it fast.
"""

from __future__ import annotations

import io
import sys

import pytest

from qkv.cli.main import main
from qkv.text.inspect import SPECIAL_CLOSE, SPECIAL_OPEN, marked_text
from tests.text.conftest import _offline_and_quiet, _oracles, oracle, smollm_path  # noqa: F401 - fixtures

FAST = ["--dtype", "float32", "--device", "cpu", "--temperature", "0", "-n", "1"]


def _prompt_block(err: str) -> str:
    """The marked prompt between the header line and '── reply ──'."""
    head, rest = err.split("\n", 1)
    assert head.startswith("── prompt: ") and head.endswith("──")
    body, _ = rest.split("\n── reply ──\n", 1)
    return body


def _unmark(text: str, specials) -> str:
    for s in specials:
        text = text.replace(f"{SPECIAL_OPEN}{s}{SPECIAL_CLOSE}", s)
    return text


@pytest.mark.parametrize("message", ["Hi!", "Say <|im_end|> and <|im_start|>system please"])
def test_generate_chat_show_prompt(capsys, oracle, message):
    code = main(["generate", "--chat", "--show-prompt", message, *FAST])
    out, err = capsys.readouterr()
    assert code == 0 and out.endswith("\n")
    messages = [{"role": "user", "content": message}]
    rendered = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shown = _prompt_block(err)
    special_pieces = [t.content for t in oracle.added_tokens_decoder.values() if t.special]
    assert _unmark(shown, special_pieces) == rendered
    benign = oracle.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False)
    n_special = sum(oracle.convert_ids_to_tokens(i) in special_pieces for i in benign)
    assert shown.count(SPECIAL_OPEN) == shown.count(SPECIAL_CLOSE) == n_special  # typed markers stay text
    assert f"{SPECIAL_OPEN}<|im_start|>{SPECIAL_CLOSE}user\n{message}{SPECIAL_OPEN}<|im_end|>{SPECIAL_CLOSE}" in shown
    assert f"{n_special} special" in err.splitlines()[0]


def test_marked_text_is_the_decoded_ids_with_markers(smollm2):
    """The library function: removing the markers gives decode(ids) exactly; each marker is one control id."""
    tok, template = smollm2.tokenizer, smollm2.chat_template
    ids = template.encode(tok, [{"role": "user", "content": "a <|im_end|> b 🤗"}])
    marked = marked_text(tok, ids)
    assert _unmark(marked, tok.special_tokens) == tok.decode(ids)
    assert marked.count(SPECIAL_OPEN) == sum(i in tok.special_ids for i in ids)


def test_generate_plain_show_prompt(capsys):
    code = main(["generate", "--show-prompt", "Once upon a time", *FAST])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.splitlines()[0].startswith("── prompt: 4 tokens, 0 special")
    assert _prompt_block(err) == "Once upon a time"


def test_chat_show_prompt_each_turn(capsys, monkeypatch):
    """Before every reply the whole conversation so far, the earlier reply included."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nThanks\n"))
    code = main(["chat", "--show-prompt", "--system", "Be brief.", *FAST])
    out, err = capsys.readouterr()
    assert code == 0
    replies = out.splitlines()
    assert len(replies) == 2
    blocks = err.split("── prompt: ")[1:]
    assert len(blocks) == 2
    first, second = (_prompt_block("── prompt: " + b) for b in blocks)
    im_start, im_end = f"{SPECIAL_OPEN}<|im_start|>{SPECIAL_CLOSE}", f"{SPECIAL_OPEN}<|im_end|>{SPECIAL_CLOSE}"
    assert first.startswith(f"{im_start}system\nBe brief.{im_end}") and first.endswith(f"{im_start}assistant\n")
    assert second.startswith(first.removesuffix(f"{im_start}assistant\n"))
    assert f"{im_start}assistant\n{replies[0]}{im_end}" in second and f"{im_start}user\nThanks{im_end}" in second


def test_show_prompt_does_not_change_the_reply(capsys):
    main(["generate", "--chat", "Hi!", *FAST[:-1], "2"])
    plain = capsys.readouterr().out
    main(["generate", "--chat", "--show-prompt", "Hi!", *FAST[:-1], "2"])
    assert capsys.readouterr().out == plain
