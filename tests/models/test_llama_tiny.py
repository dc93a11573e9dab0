"""Tiny random Llamas written by the test both ways, loaded with qkv.load, checked against transformers.

Each variant (plain; Llama-3 RoPE scaling; untied head with attention and MLP biases) is one
``transformers.LlamaForCausalLM`` with seeded weights, saved as an HF directory and as llama.cpp-style
GGUF files (see conftest). qkv must load every file to the same weights and the same logits as
transformers on those weights: F32 exactly the model's own, F16/Q8_0 what gguf-py dequantises.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from qkv.load import load
from tests.models.conftest import VARIANTS

RTOL, ATOL = 1e-4, 1e-5  # DESIGN.md: fp32 paths vs a reference


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, tiny_tok: Any, tiny: SimpleNamespace,
            tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One variant: the transformers model, its files, a batch of ids and transformers' logits."""
    name = request.param
    model = tiny.random_llama(tiny_tok, seed=1 + list(VARIANTS).index(name), **VARIANTS[name])
    root = tmp_path_factory.mktemp(f"tiny_{name}")
    hf_dir = tiny.write_hf_dir(root / "hf", model, tiny_tok)
    f32 = root / "f32.gguf"
    held = tiny.write_gguf(f32, model, tiny_tok)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (2, 80), generator=g)  # 80 > original context 64 of llama3
    with torch.no_grad():
        ref = model(ids).logits
    return SimpleNamespace(name=name, model=model, hf_dir=hf_dir, f32=f32, held=held, ids=ids, ref=ref, root=root)


def _logits(loaded: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids)


def _report(label: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    print(f"{label}: max |Δlogit| = {(ours - ref).abs().max().item():.3e} (|logit| ≤ {ref.abs().max().item():.2f})")


def test_hf_dir_loads_the_same_weights_and_logits_as_transformers(variant: SimpleNamespace) -> None:
    loaded = load(variant.hf_dir, dtype="float32", device="cpu")
    hf_cfg = variant.model.config
    assert loaded.format == "hf"
    assert loaded.config.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert (loaded.config.rope_scaling is not None) == (hf_cfg.rope_parameters.get("rope_type") == "llama3")
    assert loaded.config.tie_word_embeddings == hf_cfg.tie_word_embeddings
    ours = loaded.model.state_dict()
    for name, t in variant.model.state_dict().items():
        assert torch.equal(ours[name], t), name
    logits = _logits(loaded, variant.ids)
    _report(f"{variant.name} hf dir vs transformers", logits, variant.ref)
    torch.testing.assert_close(logits, variant.ref, rtol=RTOL, atol=ATOL)


def test_f32_gguf_equals_hf_dir_and_transformers(variant: SimpleNamespace) -> None:
    """The Q/K rows come back in rotate-half order, the biases and rope_freqs are understood."""
    from_gguf = load(variant.f32, dtype="float32", device="cpu")
    from_dir = load(variant.hf_dir, dtype="float32", device="cpu")
    assert from_gguf.format == "gguf"
    assert from_gguf.config.attention_bias == variant.model.config.attention_bias
    assert from_gguf.config.tie_word_embeddings == variant.model.config.tie_word_embeddings
    ours = from_gguf.model.state_dict()
    assert set(ours) == set(from_dir.model.state_dict())
    for name, t in variant.model.state_dict().items():
        assert torch.equal(ours[name], t), f"{name} differs after the GGUF round trip"
    a, b = _logits(from_gguf, variant.ids), _logits(from_dir, variant.ids)
    _report(f"{variant.name} gguf F32 vs hf dir", a, b)
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)  # llama3: fp32 rope_freqs vs float64 scaling
    torch.testing.assert_close(a, variant.ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("weight_type", ["F16", "Q8_0"])
def test_quantised_gguf_equals_transformers_on_the_dequantised_weights(
        variant: SimpleNamespace, tiny: SimpleNamespace, tiny_tok: Any, weight_type: str) -> None:
    path = variant.root / f"{weight_type}.gguf"
    held = tiny.write_gguf(path, variant.model, tiny_tok, weight_type=weight_type)
    loaded = load(path, dtype="float32", device="cpu")
    ours = loaded.model.state_dict()
    for name, t in held.items():  # qkv's dequantisation equals gguf-py's, rows back in HF order
        assert torch.equal(ours[name], t), name
    oracle = tiny.with_weights(variant.model, held)
    with torch.no_grad():
        ref = oracle(variant.ids).logits
    logits = _logits(loaded, variant.ids)
    _report(f"{variant.name} gguf {weight_type} vs transformers(dequantised)", logits, ref)
    torch.testing.assert_close(logits, ref, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(ref, variant.ref, rtol=RTOL, atol=ATOL), "quantisation changed nothing: weak test"


def test_cached_decode_equals_full_forward(variant: SimpleNamespace) -> None:
    """R6 on the tiny model: prefill 40 then one token at a time, past llama3's original context."""
    model = load(variant.f32, dtype="float32", device="cpu").model
    ids = variant.ids[:1]
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1, ids.shape[1])
        steps = [model(ids[:, :40], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(40, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=RTOL, atol=ATOL)


def test_last_only_prefill_gives_the_last_logits_and_the_same_cache(variant: SimpleNamespace) -> None:
    """last_only=True (the final layer on the last row alone) gives the full forward's last logits, and
    fills the cache as the full prefill does, so decoding continues identically."""
    model = load(variant.f32, dtype="float32", device="cpu").model
    ids = variant.ids[:1]
    with torch.no_grad():
        full_cache, last_cache = model.make_cache(1, ids.shape[1]), model.make_cache(1, ids.shape[1])
        full = model(ids[:, :-1], cache=full_cache)
        last = model(ids[:, :-1], cache=last_cache, last_only=True)
        torch.testing.assert_close(last, full[:, -1:], rtol=RTOL, atol=ATOL)
        for a, b in zip(last_cache, full_cache):
            assert a.offset == b.offset == ids.shape[1] - 1
            torch.testing.assert_close(a.k, b.k, rtol=0, atol=0)
            torch.testing.assert_close(a.v, b.v, rtol=0, atol=0)
        nxt = ids[:, -1:]
        torch.testing.assert_close(model(nxt, cache=last_cache), model(nxt, cache=full_cache), rtol=0, atol=0)


def test_stop_after_is_the_residual_stream_transformers_reports(variant: SimpleNamespace) -> None:
    """stop_after=k runs layers 0..k and returns their residual stream: transformers' hidden state after layer
    k (its last one is after the final norm, so the last layer is compared through ours); out of range or
    with a KV cache (its later layers would fall out of step) it is a ShapeError."""
    from qkv.errors import ShapeError

    model = load(variant.f32, dtype="float32", device="cpu").model
    with torch.no_grad():
        hidden = variant.model(variant.ids, output_hidden_states=True).hidden_states  # embeddings, then layers
        n = len(model.model.layers)
        for k in range(n - 1):
            torch.testing.assert_close(model(variant.ids, stop_after=k), hidden[k + 1], rtol=RTOL, atol=ATOL)
        last = model(variant.ids, stop_after=n - 1)
        torch.testing.assert_close(model.model.norm(last), model(variant.ids, unembed=False), rtol=0, atol=0)
        torch.testing.assert_close(model(variant.ids, stop_after=0, last_only=True), hidden[1][:, -1:],
                                   rtol=RTOL, atol=ATOL)
        for bad in (-1, n):
            with pytest.raises(ShapeError, match="stop_after"):
                model(variant.ids, stop_after=bad)
        with pytest.raises(ShapeError, match="cache"):
            model(variant.ids[:1], stop_after=0, cache=model.make_cache(1, variant.ids.shape[1]))


def test_the_checks_can_fail(variant: SimpleNamespace, tiny: SimpleNamespace, tiny_tok: Any) -> None:
    """The ids reach far enough, and the weights are sharp enough, that a wrong Q/K row order or a
    missing RoPE scaling would change the logits well beyond the tolerances above."""
    wrong = variant.root / "unpermuted.gguf"
    tiny.write_gguf(wrong, variant.model, tiny_tok, permute=False)
    assert (_logits(load(wrong, dtype="float32", device="cpu"), variant.ids) - variant.ref).abs().max() > 1e-2
    if variant.name == "llama3":
        plain = tiny.random_llama(tiny_tok, seed=0, **{**VARIANTS["llama3"], "rope_scaling": None})
        plain.load_state_dict(variant.model.state_dict())
        with torch.no_grad():
            assert (plain(variant.ids).logits - variant.ref).abs().max() > 1e-2


def test_both_files_give_the_same_tokenizer_and_template(tiny_base: SimpleNamespace) -> None:
    """The tokenizer.json and the GGUF tokenizer.ggml.* keys encode like the `tokenizers` original."""
    from_dir = load(tiny_base.hf_dir, dtype="float32", device="cpu")
    from_gguf = load(tiny_base.gguf, dtype="float32", device="cpu")
    text = "The cat attends to the dog — naïve café 42!\n\tdef f(x): return x  "
    expected = tiny_base.tok.encode(text, add_special_tokens=False).ids
    assert from_dir.tokenizer.encode(text) == expected
    assert from_gguf.tokenizer.encode(text) == expected
    assert from_gguf.tokenizer.decode(expected) == text
    assert from_dir.tokenizer.eos_id == from_gguf.tokenizer.eos_id == tiny_base.tok.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    assert from_dir.chat_template.render(messages) == from_gguf.chat_template.render(messages)
    assert from_dir.chat_template.encode(from_dir.tokenizer, messages) == \
        from_gguf.chat_template.encode(from_gguf.tokenizer, messages)


def test_sharded_hf_dir_loads_like_the_single_file(tiny_base: SimpleNamespace, tiny: SimpleNamespace,
                                                   tmp_path: Path) -> None:
    sharded = tiny.write_hf_dir(tmp_path / "sharded", tiny_base.model, tiny_base.tok, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load(sharded, dtype="float32", device="cpu"), load(tiny_base.hf_dir, dtype="float32", device="cpu")
    for name, t in b.model.state_dict().items():
        assert torch.equal(a.model.state_dict()[name], t), name
