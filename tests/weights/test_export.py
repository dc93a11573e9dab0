"""Export round trips: a qkv Llama written as an HF directory and as GGUF, read back by qkv.load with equal
logits, and read by independent readers (transformers for both, gguf-py's GGUFReader for the GGUF bytes).

Tiny models are qkv ``LlamaForCausalLM``s with seeded weights and the byte-level tokenizer; the real one
is the embedded SmolLM2 (float32, the session fixture). F32 files must give bit-identical logits; F16
files and Llama 3 RoPE scaling (stored as llama.cpp's float32 ``rope_freqs``) agree within tolerance.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gguf  # test-only oracle: a missing install must fail, not skip

import qkv.io
from qkv.config import BertConfig, LlamaConfig
from qkv.errors import ConfigError, InputError, ModelFormatError, QkvError, TokenizerError
from qkv.load import load
from qkv.models.bert import BertModel
from qkv.models.llama import LlamaForCausalLM
from qkv.nn.rope import Llama3Scaling
from qkv.text.tokenizer import Tokenizer
from qkv.weights.embedded import embedded_path
from qkv.weights.export import save_gguf, save_hf_dir
from tests.models.conftest import one_line

TEXTS = ["The cat attends to the dog — naïve café 42!\n\tdef f(x): return x  ", "Emoji 🤖 and 日本語, 12345 <|eos|>"]
TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
VARIANTS = {  # vocab 264 > 258 tokens: the GGUF vocabulary is padded as llama.cpp's converter pads it
    "tied": dict(vocab_size=258, tie_word_embeddings=True),
    "untied_bias": dict(vocab_size=264, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                        rope_theta=20000.0),
    "llama3": dict(vocab_size=264, rope_theta=500000.0,
                   rope_scaling=Llama3Scaling(original_max_position_embeddings=32)),
}


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """GQA (4 query / 2 kv heads), weights sharp enough that a wrong row order shows in the logits."""
    cfg = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                                bos_token_id=256, eos_token_id=(257,), name="tiny"), **overrides})
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    model = tiny_llama(seed=list(VARIANTS).index(request.param), **VARIANTS[request.param])
    ids = torch.randint(0, 258, (2, 60), generator=torch.Generator().manual_seed(7))  # 60 > llama3's 32
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    return SimpleNamespace(name=request.param, model=model, tok=Tokenizer.byte_level(), ids=ids,
                           ref=logits(model, ids), root=root)


# --- round trips of the tiny models ----------------------------------------------------------------------


def test_hf_dir_round_trip_is_exact(variant: SimpleNamespace) -> None:
    out = save_hf_dir(variant.model, variant.tok, variant.root / "hf", chat_template=TEMPLATE)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    with safe_open(out / "model.safetensors", "pt") as f:  # HF's convention: no lm_head.weight when tied
        assert ("lm_head.weight" in f.keys()) == (not variant.model.config.tie_word_embeddings)
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    loaded = load(out, dtype="float32", device="cpu")
    assert replace(loaded.config, name="tiny") == variant.model.config
    assert torch.equal(logits(loaded.model, variant.ids), variant.ref)
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == variant.tok.encode(text)
        assert loaded.tokenizer.encode(text, parse_special=True) == variant.tok.encode(text, parse_special=True)
    assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_ids) == (variant.tok.bos_id, variant.tok.eos_ids)
    assert loaded.tokenizer.chat_template == TEMPLATE


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_round_trip(variant: SimpleNamespace, dtype: str) -> None:
    path = save_gguf(variant.model, variant.tok, variant.root / f"{dtype}.gguf", chat_template=TEMPLATE, dtype=dtype)
    loaded = load(path, dtype="float32", device="cpu")
    cfg, ours = loaded.config, logits(loaded.model, variant.ids)
    assert (cfg.tie_word_embeddings, cfg.attention_bias, cfg.vocab_size) == (
        variant.model.config.tie_word_embeddings, variant.model.config.attention_bias, variant.model.config.vocab_size)
    if dtype == "f32" and variant.name != "llama3":
        assert torch.equal(ours, variant.ref)
    else:  # F16 weights; llama3: the scaling as float32 divisors (rope_freqs), as llama.cpp stores it
        tol = 5e-2 if dtype == "f16" else 1e-4
        torch.testing.assert_close(ours, variant.ref, rtol=tol, atol=tol)
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == variant.tok.encode(text)
        assert loaded.tokenizer.decode(variant.tok.encode(text)) == text
    assert loaded.tokenizer.chat_template == TEMPLATE


def test_gguf_is_valid_for_gguf_py(variant: SimpleNamespace) -> None:
    """An independent reader sees llama.cpp's names, shapes, types and metadata."""
    path = save_gguf(variant.model, variant.tok, variant.root / "check.gguf", dtype="f16")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = variant.model.config
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings)
    assert ("rope_freqs.weight" in tensors) == (variant.name == "llama3")
    assert ("blk.1.attn_q.bias" in tensors) == cfg.attention_bias
    assert len(tensors) == 3 + 9 * 2 - cfg.tie_word_embeddings + 7 * 2 * cfg.attention_bias + (variant.name == "llama3")
    assert list(tensors["token_embd.weight"].shape) == [64, cfg.vocab_size]  # ggml order: fastest dim first
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert tensors["blk.0.ffn_gate.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    assert (field("llama.block_count"), field("llama.attention.head_count_kv"), field("llama.rope.freq_base")) == (
        2, 2, cfg.rope_theta)
    assert field("general.file_type") == 1 and field("tokenizer.ggml.pre") == "default"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and tokens[256:258] == ["<|bos|>", "<|eos|>"]
    assert field("tokenizer.ggml.token_type")[255:258] == [1, 3, 3]


def test_transformers_reads_the_exported_files(variant: SimpleNamespace) -> None:
    """transformers as the oracle: its own loader for the HF directory, and its own GGUF reader (with its
    own inverse of the Q/K permutation) for the F32 file of the plain variant — transformers' GGUF path
    builds a Llama without biases and without rope_freqs, as llama.cpp files have no config key for them."""
    import transformers

    hf_dir = save_hf_dir(variant.model, variant.tok, variant.root / "hf_oracle")
    oracle = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(oracle(variant.ids).logits, variant.ref, rtol=1e-4, atol=1e-4)
    if variant.name == "tied":
        save_gguf(variant.model, variant.tok, variant.root / "oracle.gguf")
        oracle = transformers.LlamaForCausalLM.from_pretrained(variant.root, gguf_file="oracle.gguf",
                                                               dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(oracle(variant.ids).logits, variant.ref, rtol=1e-4, atol=1e-4)


def test_bf16_model_is_saved_as_float32(tmp_path: Path) -> None:
    model = tiny_llama(**VARIANTS["untied_bias"]).to(torch.bfloat16)
    for loaded in (load(save_hf_dir(model, Tokenizer.byte_level(), tmp_path / "hf"), dtype="float32", device="cpu"),
                   load(save_gguf(model, Tokenizer.byte_level(), tmp_path / "m.gguf"), dtype="float32", device="cpu")):
        for name, t in model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name], t.float()), name


def test_fast_decode_model_exports_its_exact_weights(tmp_path: Path) -> None:
    """qkv.load(dtype="auto") of a Q4_0 GGUF fuses q/k/v and gate/up into int4 decode layers; the export
    splits them back and writes the exact float weights, equal to a dtype="float32" load."""
    from tests.models.conftest import random_llama, tiny_tokenizer, write_gguf

    tok = tiny_tokenizer()
    write_gguf(tmp_path / "q4.gguf", random_llama(tok, seed=3), tok, weight_type="Q4_0")
    fast = load(tmp_path / "q4.gguf", dtype="auto", device="cpu")
    assert fast.model.model.layers[0].self_attn.qkv_proj is not None, "no fused layers: weak test"
    exact = load(tmp_path / "q4.gguf", dtype="float32", device="cpu").model.state_dict()
    for path in (save_gguf(fast.model, fast.tokenizer, tmp_path / "out.gguf"),
                 save_hf_dir(fast.model, fast.tokenizer, tmp_path / "out_hf")):
        back = load(path, dtype="float32", device="cpu").model.state_dict()
        assert back.keys() == exact.keys() and all(torch.equal(back[k], exact[k]) for k in exact), path


# --- tokenizers that came from tokenizer.json --------------------------------------------------------------


@pytest.mark.parametrize("digits", [False, True])
def test_hf_byte_level_tokenizer_becomes_gguf_metadata(tmp_path: Path, digits: bool) -> None:
    """GPT-2 splitting -> pre "gpt2"; SmolLM2's Digits + ByteLevel -> "smollm"; special/added token types."""
    from tokenizers import pre_tokenizers

    from tests.models.conftest import tiny_tokenizer

    backend = tiny_tokenizer()
    if digits:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.add_tokens(["<user-word>"])
    tmp_path.joinpath("tokenizer.json").write_text(backend.to_str())
    tmp_path.joinpath("tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}')
    hf = Tokenizer.from_hf_dir(tmp_path)
    meta = hf.to_gguf_metadata()
    assert meta["tokenizer.ggml.pre"] == ("smollm" if digits else "gpt2")
    types = meta["tokenizer.ggml.token_type"]
    assert types[hf.token_to_id("<|im_end|>")] == 3 and types[hf.token_to_id("<user-word>")] == 4
    back = Tokenizer.from_gguf_metadata(meta, source="exported")
    for text in [*TEXTS, "x <user-word> 2024 <|im_end|>"]:
        assert back.encode(text) == hf.encode(text)
    assert back.eos_ids == hf.eos_ids and back.special_ids == hf.special_ids


def test_sentencepiece_gguf_tokenizer_round_trips(tmp_path: Path) -> None:
    """A SentencePiece-style GGUF vocabulary ('▁', scores, <0xNN> bytes, BOS added, a user-defined token)
    survives both exports: its own fields into GGUF, its `tokenizers` pipeline into tokenizer.json."""
    words = ["▁", "e", "l", "h", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
             "world", "▁world", "é", "日"]
    tokens = [("<unk>", 2), ("<s>", 3), ("</s>", 3), *((f"<0x{b:02X}>", 6) for b in range(256)),
              *((w, 1) for w in words), ("<tool>", 4)]
    spm = Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [t for t, _ in tokens],
        "tokenizer.ggml.token_type": [k for _, k in tokens],
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }, source="spm")
    model = tiny_llama(vocab_size=len(tokens) + 3, bos_token_id=1, eos_token_id=(2,))
    for path in (save_gguf(model, spm, tmp_path / "spm.gguf"), save_hf_dir(model, spm, tmp_path / "hf")):
        back = load(path, dtype="float32", device="cpu").tokenizer
        for text in ["hello world", " hello  world", "日本 🤗 x", "a<tool>b", "hello</s>"]:
            assert back.encode(text) == spm.encode(text), (path, text)
            assert back.decode(spm.encode(text)) == spm.decode(spm.encode(text))
        assert (back.bos_id, back.eos_ids, back.unk_id) == (spm.bos_id, spm.eos_ids, spm.unk_id)


def test_tokenizer_gguf_cannot_express_is_refused(tmp_path: Path) -> None:
    """A WordPiece vocabulary (the embedded MiniLM) has no GGUF form here: a clear error, no file."""
    wordpiece = Tokenizer.from_hf_dir(embedded_path("minilm"))
    with pytest.raises(TokenizerError, match="byte-level BPE") as info:
        save_gguf(tiny_llama(vocab_size=wordpiece.vocab_size), wordpiece, tmp_path / "m.gguf")
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())


# --- the real model -------------------------------------------------------------------------------------


def test_smollm2_round_trips_through_gguf_and_hf_dir(smollm2, tmp_path: Path) -> None:
    tok = smollm2.tokenizer
    text = "The printing press, invented around 1440, changed Europe — naïvely 42× faster."
    ids = torch.tensor([tok.encode("The capital of France is")])
    ref = logits(smollm2.model, ids)
    gguf_back = load(save_gguf(smollm2.model, tok, tmp_path / "smollm2.gguf"), dtype="float32", device="cpu")
    hf_back = load(save_hf_dir(smollm2.model, tok, tmp_path / "hf"), dtype="float32", device="cpu")
    for back in (gguf_back, hf_back):
        assert torch.equal(logits(back.model, ids), ref)
        assert back.tokenizer.encode(text) == tok.encode(text)
        assert (back.tokenizer.bos_id, back.tokenizer.eos_ids) == (tok.bos_id, tok.eos_ids)
        assert back.tokenizer.chat_template == tok.chat_template
    assert gguf_back.tokenizer.gguf_metadata == tok.gguf_metadata  # the original fields, unchanged
    derived = Tokenizer.from_gguf_metadata(hf_back.tokenizer.to_gguf_metadata(), source="derived")
    assert derived.encode(text) == tok.encode(text)  # tokenizer.json -> GGUF fields, on a 49k vocabulary


# --- bad inputs -----------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert isinstance(exc.value, QkvError), exc.value
    return one_line(exc.value)


def test_output_paths_that_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_llama(vocab_size=258), Tokenizer.byte_level()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError) as e:
        save_hf_dir(model, tok, a_file)
    assert "is a file" in _one_line(e)
    with pytest.raises(InputError) as e:
        save_hf_dir(model, tok, a_file / "sub")
    assert "cannot create directory" in _one_line(e)
    with pytest.raises(InputError) as e:
        save_gguf(model, tok, tmp_path)
    assert "is a directory" in _one_line(e)
    with pytest.raises(InputError) as e:
        save_gguf(model, tok, tmp_path / "missing" / "m.gguf")
    assert "does not exist" in _one_line(e)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(InputError) as e:
        save_hf_dir(model, tok, stale)
    assert "model.safetensors.index.json" in _one_line(e)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(qkv.io.tempfile, "mkstemp", refuse)  # a read-only directory (tests may run as root)
    with pytest.raises(InputError) as e:
        save_gguf(model, tok, tmp_path / "ro.gguf")
    assert "Permission denied" in _one_line(e) and not (tmp_path / "ro.gguf").exists()


def test_failed_gguf_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qkv.weights.export as export

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    def disk_full(f, t, ggml_type):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_tensor", disk_full)
    with pytest.raises(InputError) as e:
        save_gguf(tiny_llama(vocab_size=258), Tokenizer.byte_level(), target)
    assert "No space left" in _one_line(e)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_what_is_not_a_llama_is_refused(tmp_path: Path, smollm2) -> None:
    tok = Tokenizer.byte_level()
    bert = BertModel(BertConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2))
    for bad in (bert, smollm2):  # smollm2 is a Loaded, not its .model
        for save in (save_hf_dir, save_gguf):
            with pytest.raises(ConfigError) as e:
                save(bad, tok, tmp_path / "out")
            assert "Llama" in _one_line(e) and "fix:" in str(e.value)
    with pytest.raises(TokenizerError) as e:
        save_gguf(tiny_llama(vocab_size=200, bos_token_id=None, eos_token_id=()), tok, tmp_path / "m.gguf")
    assert "258 tokens" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        save_gguf(tiny_llama(vocab_size=258), tok, tmp_path / "m.gguf", dtype="q8_0")
    assert "f32, f16" in _one_line(e)
    broken = tiny_llama(vocab_size=258)
    broken.model.layers[0].mlp.extra = torch.nn.Linear(2, 2)  # a parameter the format has no name for
    with pytest.raises(ModelFormatError) as e:
        save_gguf(broken, tok, tmp_path / "m.gguf")
    assert "unexpected: model.layers.0.mlp.extra.bias" in _one_line(e)
    assert not list(tmp_path.iterdir())
