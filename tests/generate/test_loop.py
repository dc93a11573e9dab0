"""The generation loop on the real embedded model: cache, batching, EOS, stop strings, budgets (A11–A14, K8/K9)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.errors import InputError
from qkv.generate import SamplingOptions, generate_ids, generate_ids_batch
from qkv.generate.text import _held_back

GREEDY = SamplingOptions(temperature=0)


def full_forward_greedy(model, ids, n):
    """Greedy tokens recomputing the whole sequence each step (no cache): the reference."""
    x = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x)[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def test_cached_decode_equals_full_recompute(smollm2):
    ids = smollm2.tokenizer.encode("The three primary colours are")
    cached = list(generate_ids(smollm2.model, ids, GREEDY, max_new_tokens=32))
    assert cached == full_forward_greedy(smollm2.model, ids, 32)


def test_batched_left_padded_equals_unbatched(smollm2):
    """A11: prompts of 1, 7 and ~30 tokens batched with left padding give each row's own tokens."""
    tok = smollm2.tokenizer
    prompts = [tok.encode("Hi"), tok.encode("Water boils at a temperature of"),
               tok.encode("In 1969, the Apollo 11 mission landed the first humans on the Moon. The commander of "
                          "the mission, who was the first to step onto the surface, was named")]
    assert [len(p) for p in prompts][0] == 1 and len(prompts[2]) >= 25
    batched = generate_ids_batch(smollm2.model, prompts, GREEDY, max_new_tokens=12, pad_id=tok.pad_id or 0)
    for p, row in zip(prompts, batched):
        assert row == list(generate_ids(smollm2.model, p, GREEDY, max_new_tokens=12))


def test_eos_stops_and_is_not_printed(smollm2):
    pieces = list(qkv.generate(smollm2, "Say only the word: yes", chat=True, temperature=0, max_new_tokens=40))
    assert pieces[-1].finish_reason == "eos"
    assert "<|im_end|>" not in "".join(p.text for p in pieces)


def test_stop_ids_make_eos_the_first_token(smollm2):
    """A14: an EOS as the very first token ends the generation with no text."""
    ids = smollm2.tokenizer.encode("Hello")
    first = next(generate_ids(smollm2.model, ids, GREEDY, max_new_tokens=5))
    pieces = list(qkv.generate(smollm2, "Hello", temperature=0, max_new_tokens=5, stop_ids=[first]))
    assert [p.finish_reason for p in pieces] == ["eos"] and pieces[0].text == ""


def test_stop_string_spanning_tokens(smollm2):
    free = "".join(p.text for p in qkv.generate(smollm2, "Once upon a time", temperature=0, max_new_tokens=30))
    words = free.split()
    stop = " ".join(words[3:5])  # two words: almost surely more than one token
    assert stop and stop in free
    pieces = list(qkv.generate(smollm2, "Once upon a time", temperature=0, max_new_tokens=30, stop=[stop]))
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == "stop"
    assert text == free[:free.index(stop)]


def test_held_back_keeps_partial_stop_prefix():
    assert _held_back("hello wor", ("world",)) == 3
    assert _held_back("hello", ("xyz",)) == 0


def test_max_new_tokens_zero_gives_nothing_and_length_reason(smollm2):
    pieces = list(qkv.generate(smollm2, "Hi", max_new_tokens=0))
    assert [p.finish_reason for p in pieces] == ["length"] and pieces[0].text == ""
    pieces = list(qkv.generate(smollm2, "Hi", temperature=0, max_new_tokens=3))
    assert pieces[-1].finish_reason == "length" and sum(p.token_id is not None for p in pieces) == 3


@pytest.mark.parametrize("n,match", [(-1, "max_new_tokens must be"), (10**9, "exceeds the context window")])
def test_budget_errors_before_any_model_call(smollm2, n, match):
    with pytest.raises(InputError, match=match):
        list(qkv.generate(smollm2, "Hi", max_new_tokens=n))


def test_prompt_longer_than_context_is_an_error(smollm2):
    ids = [5] * (smollm2.config.max_position_embeddings + 1)
    with pytest.raises(InputError, match="context window"):
        list(generate_ids(smollm2.model, ids, GREEDY, max_new_tokens=1))
    with pytest.raises(InputError, match="no tokens"):
        list(generate_ids(smollm2.model, [], GREEDY, max_new_tokens=1))


def test_seeded_sampling_is_reproducible(smollm2):
    run = lambda: [p.token_id for p in qkv.generate(smollm2, "A poem:", temperature=1.0, top_p=0.9, seed=11,  # noqa
                                                    max_new_tokens=10)]
    assert run() == run()


def test_streamed_text_equals_decode_of_all_ids(smollm2):
    pieces = list(qkv.generate(smollm2, "Emoji and accents: café 😀", temperature=0, max_new_tokens=20))
    ids = [p.token_id for p in pieces if p.token_id is not None]
    assert "".join(p.text for p in pieces) == smollm2.tokenizer.decode(ids, skip_special=True)
    assert all("\ufffd" not in p.text for p in pieces[:-1])


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_tokens(smollm2, monkeypatch):
    """Past PREFILL_CHUNK tokens the prompt goes in chunks, each attending to the cache of the ones before (the
    activations of an 8k prompt bounded by the chunk): the same greedy tokens as the full recompute, and the
    model saw chunk-sized inputs."""
    from qkv.generate import loop

    ids = smollm2.tokenizer.encode("Queries meet keys; values are mixed by the weights of a softmax. " * 6)[:70]
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 32)
    seen = []
    hook = smollm2.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].shape[1]),
                                                   with_kwargs=True)
    try:
        got = list(generate_ids(smollm2.model, ids, SamplingOptions(temperature=0), max_new_tokens=8))
    finally:
        hook.remove()
    assert seen[:3] == [32, 32, 6] and seen[3:] == [1] * 7
    assert got == full_forward_greedy(smollm2.model, ids, 8)
