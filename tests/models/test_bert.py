"""The BERT encoder and ``qkv.embed`` against Hugging Face transformers on the real embedded all-MiniLM-L6-v2.

The oracle is transformers' ``BertModel`` loaded from the same directory with its own code and its own
tokenizer. Sentence embeddings are checked against the sentence-transformers rule (mean of the real
tokens' vectors, then L2 normalisation) written out here, independently of ``qkv.embed``
(sentence-transformers itself is not installed). Tiny random BERTs written by transformers'
``save_pretrained`` cover the other checkpoint layouts (``bert.`` prefix, pretraining heads, no
pooler) and the load errors. Each parity test prints its measured error (``pytest -s`` shows it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qkv
from qkv.embed import sentence_config
from qkv.errors import ConfigError, InputError, ModelFormatError, ShapeError, TokenizerError
from qkv.explain.capture import capture
from qkv.weights.embedded import embedded_path
from tests.models.conftest import one_line, transformers

RTOL, ATOL = 1e-4, 1e-5  # RELIABILITY R2: fp32 hidden states
ATTN_ATOL = 1e-6
ATTN_ATOL_FP32_DEEP = 5e-6  # fp32, layers > 0: rounding carried through the layers (measured ~1.5e-6)
MIN_COSINE = 0.9999

SENTENCES = [
    "He sat on the river's bank.",
    "The bank raised its interest rates again this quarter, surprising most analysts.",
    "A cat.",
    "Café naïve Ångström — accents, dashes; 12,345 numbers and 3.14159!",
    "日本語のテキストと中文文本 mixed with English words",
    "  leading and trailing spaces\tand\ttabs  ",
]
# > 256 tokens, and its end is about something else: truncation at 256 changes its vector
LONG = " ".join(["attention is all you need and every token attends to every other token"] * 20
                + ["the stock market crashed and investors sold their bonds in a panic"] * 10)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return embedded_path("minilm")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return qkv.load("minilm", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ref(minilm_dir) -> SimpleNamespace:
    """transformers' BertModel (eager attention, so that it can return weights) and its tokenizer."""
    model = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    return SimpleNamespace(model=model, tok=tok)


def _ref_batch(ref, texts, **kw):
    return ref.tok(texts, padding=True, return_tensors="pt", **kw)


# --- the encoder ---------------------------------------------------------------------------------------


def test_loaded_model_is_the_bert_encoder(minilm, minilm_dir):
    cfg = minilm.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (6, 12, 384)
    assert minilm.model.is_causal is False and minilm.chat_template is None
    assert (minilm.format, minilm.name, minilm.source) == ("hf", "minilm", minilm_dir)
    assert minilm.info["parameters"] == sum(p.numel() for p in minilm.model.parameters())


def test_load_by_path_equals_load_by_name(minilm, minilm_dir):
    by_path = qkv.load(minilm_dir, device="cpu")
    assert dataclasses.replace(by_path.config, name="minilm") == minilm.config
    assert (by_path.format, by_path.source) == ("hf", minilm_dir)
    ids = torch.tensor([minilm.tokenizer.encode(SENTENCES[0])])
    assert torch.equal(by_path.model(ids), minilm.model(ids))


def test_tokenizer_ids_match_transformers(minilm, ref):
    for text in SENTENCES + [LONG]:
        assert minilm.tokenizer.encode(text) == ref.tok(text)["input_ids"], text


def test_hidden_states_match_transformers_padded_batch(minilm, ref):
    """One padded batch through both models; only real positions are compared (padding is meaningless)."""
    batch = _ref_batch(ref, SENTENCES)
    ours = minilm.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        theirs = ref.model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    err = (ours - theirs)[real].abs().max().item()
    print(f"\nminilm hidden states, padded batch of {len(SENTENCES)}: max |ours - transformers| = {err:.2e}")
    torch.testing.assert_close(ours[real], theirs[real], rtol=RTOL, atol=ATOL)


def test_padding_does_not_change_real_positions(minilm, ref):
    batch = _ref_batch(ref, SENTENCES)
    padded = minilm.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    for i, text in enumerate(SENTENCES):
        ids = torch.tensor([minilm.tokenizer.encode(text)])
        alone = minilm.model(ids)
        torch.testing.assert_close(padded[i, :ids.shape[1]], alone[0], rtol=RTOL, atol=ATOL)


def test_token_types_and_pooler_match_transformers(minilm, ref):
    batch = ref.tok(["How old are you?"], ["I am six years old."], return_tensors="pt")
    assert int(batch["token_type_ids"].max()) == 1
    ours = minilm.model(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    with torch.no_grad():
        out = ref.model(**batch)
    torch.testing.assert_close(ours, out.last_hidden_state, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(minilm.model.pool(ours), out.pooler_output, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def pair64(minilm_dir, ref) -> SimpleNamespace:
    """Both models in float64: what is left of the difference is the fp32 rounding of the weight rows."""
    return SimpleNamespace(ours=qkv.load("minilm", dtype=torch.float64, device="cpu"),
                           theirs=copy.deepcopy(ref.model).double(), tok=ref.tok)


def _attention_errors(ours, theirs, tok, texts) -> torch.Tensor:
    """Max |captured - transformers eager| per layer over every head and query of ``texts``: (L,)."""
    worst = None
    for text in texts:
        rec = capture(ours, text)
        with torch.no_grad():
            attn = theirs(**tok(text, return_tensors="pt"), output_attentions=True).attentions
        ref_w = torch.stack([a[0] for a in attn]).double()  # (L, H, T, T)
        assert rec.kind == "self" and rec.weights.shape == ref_w.shape
        err = (rec.weights.double() - ref_w).abs().amax(dim=(1, 2, 3))  # (L,)
        worst = err if worst is None else torch.maximum(worst, err)
    return worst


def test_attention_weights_match_transformers_float64(pair64):
    """qkv.explain's captured rows (every layer, head, query) equal transformers' eager attention weights."""
    err = _attention_errors(pair64.ours, pair64.theirs, pair64.tok, SENTENCES[:3])
    print(f"\nminilm attention weights, float64 models: max error per layer {[f'{e:.1e}' for e in err.tolist()]}")
    assert err.max().item() <= ATTN_ATOL


def test_attention_weights_match_transformers_float32(minilm, ref):
    """The same in float32, as users run it. Layer 0 sees identical inputs and is held to 1e-6; deeper
    layers see hidden states that already differ by fp32 rounding (R2) and their weights by ~1e-6,
    which the float64 test above shows is rounding, not a difference in the computation."""
    err = _attention_errors(minilm, ref.model, ref.tok, SENTENCES[:3])
    print(f"\nminilm attention weights, float32: max error per layer {[f'{e:.1e}' for e in err.tolist()]}")
    assert err[0].item() <= ATTN_ATOL
    assert err.max().item() <= ATTN_ATOL_FP32_DEEP


# --- qkv.embed ---------------------------------------------------------------------------------------------


def _reference_embeddings(ref, minilm_dir, texts, max_len=None):
    """The sentence-transformers rule, written here: mean over real tokens, then divide by the L2 norm."""
    max_len = max_len or json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    batch = _ref_batch(ref, texts, truncation=True, max_length=max_len)
    with torch.no_grad():
        h = ref.model(**batch).last_hidden_state  # (B, T, C)
    m = batch["attention_mask"].unsqueeze(-1).float()
    mean = (h * m).sum(1) / m.sum(1)
    return mean / mean.norm(dim=1, keepdim=True)


def test_embed_matches_sentence_transformers_rule(minilm, ref, minilm_dir):
    texts = SENTENCES + [LONG]  # LONG is truncated to max_seq_length = 256 tokens on both sides
    ours = qkv.embed(minilm, texts, batch_size=3)
    theirs = torch.cat([_reference_embeddings(ref, minilm_dir, SENTENCES),  # padded to the longest
                        _reference_embeddings(ref, minilm_dir, [LONG])])  # alone: no 256-wide padded batch
    cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    print(f"\nminilm embeddings: min cosine = {cos.min().item():.8f}, "
          f"max |ours - reference| = {(ours - theirs).abs().max().item():.2e}")
    assert ours.shape == (len(texts), 384) and ours.dtype == torch.float32
    assert cos.min().item() >= MIN_COSINE
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(texts)))
    untruncated = _reference_embeddings(ref, minilm_dir, [LONG], max_len=512)[0]
    assert torch.dot(ours[-1], untruncated).item() < MIN_COSINE  # so the check above did test truncation


def test_embed_single_string_and_unnormalised(minilm):
    one = qkv.embed(minilm, SENTENCES[0])
    assert one.shape == (1, 384)
    raw = qkv.embed(minilm, [SENTENCES[0]], normalize=False)
    torch.testing.assert_close(one, raw / raw.norm(dim=1, keepdim=True))
    assert abs(raw.norm().item() - 1) > 1e-3  # the raw mean is not a unit vector


def test_embed_reads_the_directory_settings(minilm):
    assert sentence_config(minilm).pooling == "mean" and sentence_config(minilm).max_length == 256


@pytest.mark.parametrize("bad", [[], "", "   ", [""], ["ok", "\n"], None, 3, ["ok", None], [b"bytes"], ("ok", 1)])
def test_embed_bad_sentences(minilm, bad):
    with pytest.raises(InputError) as e:
        qkv.embed(minilm, bad)
    one_line(e.value)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_embed_bad_batch_size(minilm, size):
    with pytest.raises(InputError):
        qkv.embed(minilm, "a sentence", batch_size=size)


def test_embed_refuses_a_decoder():
    decoder = SimpleNamespace(model=SimpleNamespace(is_causal=True), name="smollm2")
    with pytest.raises(InputError, match="decoder"):
        qkv.embed(decoder, "a sentence")


def test_model_input_errors(minilm):
    ids = torch.tensor([minilm.tokenizer.encode("a b c")])
    cases = [
        dict(input_ids=ids.float()),
        dict(input_ids=torch.zeros(1, 0, dtype=torch.long)),
        dict(input_ids=torch.ones(1, 513, dtype=torch.long)),
        dict(input_ids=ids, attention_mask=torch.ones(1, 2)),
        dict(input_ids=ids, token_type_ids=torch.full_like(ids, 2)),
        dict(input_ids=torch.full_like(ids, 30522)),
    ]
    for kw in cases:
        with pytest.raises(ShapeError):
            minilm.model(kw.pop("input_ids"), **kw)


# --- other checkpoint layouts and load errors (tiny random BERTs) ---------------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, vocab_size=30522)


def _tiny_dir(path: Path, minilm_dir: Path, cls=None, **overrides) -> tuple[Path, object]:
    """A transformers BERT with seeded weights (large enough for non-uniform attention), saved with
    the minilm tokenizer beside it."""
    cfg = transformers.BertConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = (cls or transformers.BertModel)(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" not in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, path / name)
    return path, model


def test_masked_lm_checkpoint_loads_encoder_only(tmp_path, minilm_dir):
    """``bert.``-prefixed names and the MLM head (ignored); no pooler weights -> no pooler."""
    path, model = _tiny_dir(tmp_path / "mlm", minilm_dir, cls=transformers.BertForMaskedLM)
    loaded = qkv.load(path, device="cpu")
    assert loaded.model.pooler is None and loaded.config.add_pooling_layer is False
    ids = torch.tensor([loaded.tokenizer.encode(SENTENCES[1])])
    with torch.no_grad():
        theirs = model.bert(ids).last_hidden_state
    torch.testing.assert_close(loaded.model(ids), theirs, rtol=RTOL, atol=ATOL)
    with pytest.raises(ShapeError):
        loaded.model.pool(theirs)


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_other_activations_match_transformers(tmp_path, minilm_dir, act):
    path, model = _tiny_dir(tmp_path / act, minilm_dir, hidden_act=act)
    loaded = qkv.load(path, device="cpu")
    batch = transformers.AutoTokenizer.from_pretrained(str(path))(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch)
    ours = loaded.model(batch["input_ids"], attention_mask=batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs.last_hidden_state[real], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loaded.model.pool(ours), theirs.pooler_output, rtol=RTOL, atol=ATOL)


def test_tiny_cls_pooling(tmp_path, minilm_dir):
    path, model = _tiny_dir(tmp_path / "cls", minilm_dir)
    (path / "pool").mkdir()
    (path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (path / "modules.json").write_text(json.dumps([{"path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    loaded = qkv.load(path, device="cpu")
    ids = torch.tensor([loaded.tokenizer.encode(SENTENCES[0])])
    with torch.no_grad():
        first = model(ids).last_hidden_state[:, 0]
    torch.testing.assert_close(qkv.embed(loaded, SENTENCES[0]), first / first.norm(dim=1, keepdim=True),
                               rtol=RTOL, atol=ATOL)
    assert sentence_config(loaded).max_length == 64  # no sentence_bert_config.json: the model's positions


@pytest.mark.parametrize("pooling, match", [
    ({"pooling_mode_max_tokens": True}, "not supported"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, "exactly one"),
    ({}, "exactly one"),
])
def test_unsupported_pooling(tmp_path, minilm_dir, pooling, match):
    path, _ = _tiny_dir(tmp_path / "pool", minilm_dir)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    loaded = qkv.load(path, device="cpu")
    with pytest.raises(ConfigError, match=match) as e:
        qkv.embed(loaded, "a sentence")
    one_line(e.value)


def test_module_path_outside_the_directory(tmp_path, minilm_dir):
    path, _ = _tiny_dir(tmp_path / "escape", minilm_dir)
    (path / "modules.json").write_text(json.dumps([{"path": "..", "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(ModelFormatError):
        qkv.embed(qkv.load(path, device="cpu"), "a sentence")


def _edit_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("encoder.layer.1.attention.self.key.weight"), ["missing", "encoder.layer.1.attention.k_proj"]),
    (lambda s: s.update({"encoder.layer.0.extra.weight": torch.zeros(2)}), ["unexpected", "extra"]),
    (lambda s: s.update({"embeddings.token_type_embeddings.weight": torch.zeros(3, 32)}),
     ["wrong shape", "token_type_embeddings", "(3, 32)"]),
])
def test_weights_that_do_not_fit(tmp_path, minilm_dir, edit, words):
    path, _ = _tiny_dir(tmp_path / "bad", minilm_dir)
    _edit_weights(path, edit)
    with pytest.raises(ModelFormatError) as e:
        qkv.load(path, device="cpu")
    assert all(w in one_line(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("change, error", [
    ({"hidden_act": "swish"}, ConfigError),
    ({"num_attention_heads": 5}, ConfigError),
    ({"position_embedding_type": "relative_key"}, ConfigError),
    ({"is_decoder": True}, ConfigError),
    ({"vocab_size": 100}, ModelFormatError),  # the tokenizer has 30522 tokens
])
def test_bad_config(tmp_path, minilm_dir, change, error):
    path, _ = _tiny_dir(tmp_path / "cfg", minilm_dir)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(error) as e:
        qkv.load(path, device="cpu")
    one_line(e.value)


def test_missing_files(tmp_path, minilm_dir):
    path, _ = _tiny_dir(tmp_path / "files", minilm_dir)
    (path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError):
        qkv.load(path, device="cpu")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        qkv.load(path, device="cpu")
    (path / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        qkv.load(path, device="cpu")
