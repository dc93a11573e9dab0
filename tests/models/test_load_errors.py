"""qkv.load on bad model directories and files: RELIABILITY.md §9.2 (S1, S5–S8, S10, S11) and §9.1.

Every case must raise a ``QkvError`` subclass whose message is one line naming what is wrong — never
a traceback from safetensors, torch or json, never a silently random weight, never code run from
the model directory. Each case starts from a valid tiny model (conftest) and breaks one thing.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qkv.errors import ConfigError, ModelFormatError, QkvError
from qkv.load import load
from qkv.weights.embedded import embedded_names
from tests.models.conftest import one_line


@pytest.fixture
def model_dir(tiny_base: SimpleNamespace, tmp_path: Path) -> Path:
    """A fresh copy of the valid tiny HF directory, to break."""
    return Path(shutil.copytree(tiny_base.hf_dir, tmp_path / "model"))


def _fails(path: Path | str, kind: type[QkvError] = ModelFormatError, *must_name: str) -> str:
    """qkv.load(path) raises ``kind`` (a QkvError) with a one-line message naming each of ``must_name``."""
    with pytest.raises(QkvError) as info:
        load(path, dtype="float32", device="cpu")
    assert isinstance(info.value, kind), f"{type(info.value).__name__}: {info.value}"
    msg = one_line(info.value)
    print(f"{type(info.value).__name__}: {msg}")
    for name in must_name:
        assert name in msg, f"{name!r} not named in: {msg}"
    return msg


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_config(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    edit(cfg)
    (model_dir / "config.json").write_text(json.dumps(cfg))  # NaN is written as the JSON extension NaN


def test_the_unbroken_copy_loads(model_dir: Path) -> None:
    assert load(model_dir, dtype="float32", device="cpu").config.num_hidden_layers == 2


# --- S5: tensors that do not fit the architecture ----------------------------------------------------


def test_missing_tensor_is_named(model_dir: Path) -> None:
    _edit_tensors(model_dir / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _fails(model_dir, ModelFormatError, "missing", "model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor_is_named(model_dir: Path) -> None:
    _edit_tensors(model_dir / "model.safetensors",
                  lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(4)}))
    _fails(model_dir, ModelFormatError, "unexpected", "model.layers.0.self_attn.extra.weight")


def test_old_rotary_inv_freq_buffers_are_ignored(model_dir: Path, tiny_base: SimpleNamespace) -> None:
    """Checkpoints from transformers < 4.32 saved each layer's RoPE frequencies; they are not weights."""
    _edit_tensors(model_dir / "model.safetensors",
                  lambda t: t.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in (0, 1)}))
    loaded = load(model_dir, dtype="float32", device="cpu")
    assert torch.equal(loaded.model.model.norm.weight, tiny_base.model.model.norm.weight)


def test_misshaped_tensor_is_named_with_both_shapes(model_dir: Path) -> None:
    _edit_tensors(model_dir / "model.safetensors",
                  lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 64)}))
    _fails(model_dir, ModelFormatError, "model.layers.0.self_attn.k_proj.weight", "(24, 64)", "(32, 64)")


def test_gguf_missing_and_unknown_tensors_are_named(tiny_base: SimpleNamespace, tiny: SimpleNamespace,
                                                    tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    tiny.write_gguf(missing, tiny_base.model, tiny_base.tok, drop=("blk.1.ffn_down.weight",))
    _fails(missing, ModelFormatError, "missing", "model.layers.1.mlp.down_proj.weight")
    unknown = tmp_path / "unknown.gguf"
    tiny.write_gguf(unknown, tiny_base.model, tiny_base.tok, extra={"blk.0.attn_mystery.weight": np.ones(4, np.float32)})
    _fails(unknown, ModelFormatError, "blk.0.attn_mystery.weight")


def test_load_tokenizer_checks_a_gguf_as_load_does_without_its_weights(tiny_base: SimpleNamespace,
                                                                        tiny: SimpleNamespace, tmp_path: Path) -> None:
    """``qkv tokenize``'s loader: a GGUF's tokenizer and template from its metadata, refused for the same reasons
    as load() (a tensor table that does not fit the configuration), and the same tokenizer as load()'s."""
    from qkv.load import load_tokenizer

    missing = tmp_path / "missing.gguf"
    tiny.write_gguf(missing, tiny_base.model, tiny_base.tok, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(ModelFormatError, match="model.layers.1.mlp.down_proj.weight"):
        load_tokenizer(missing)
    whole = tmp_path / "whole.gguf"
    tiny.write_gguf(whole, tiny_base.model, tiny_base.tok)
    name, tok, template = load_tokenizer(whole)
    loaded = load(whole, dtype="float32", device="cpu")
    text = "hello world, the bank"
    assert name == loaded.name and tok.encode(text) == loaded.tokenizer.encode(text)
    assert tok.vocab_size == loaded.tokenizer.vocab_size and (template is None) == (loaded.chat_template is None)


# --- S8: config.json values ---------------------------------------------------------------------------


def _drop_head_dim_and_split_5(cfg: dict[str, Any]) -> None:
    cfg.pop("head_dim", None)
    cfg.update(num_attention_heads=5, num_key_value_heads=5)  # 64 % 5 != 0


def _nan_theta_old_style(cfg: dict[str, Any]) -> None:
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = math.nan


BAD_CONFIGS = {
    "negative hidden_size": (lambda c: c.update(hidden_size=-64), "hidden_size"),
    "zero layers": (lambda c: c.update(num_hidden_layers=0), "num_hidden_layers"),
    "float intermediate_size": (lambda c: c.update(intermediate_size=128.0), "intermediate_size"),
    "huge vocab_size": (lambda c: c.update(vocab_size=2**40), "vocab_size"),
    "string heads": (lambda c: c.update(num_attention_heads="4"), "num_attention_heads"),
    "hidden % heads != 0": (_drop_head_dim_and_split_5, "hidden_size"),
    "heads % kv heads != 0": (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    "NaN rope_theta (rope_parameters)": (lambda c: c["rope_parameters"].update(rope_theta=math.nan), "rope_theta"),
    "NaN rope_theta (top level)": (_nan_theta_old_style, "rope_theta"),
    "negative rms_norm_eps": (lambda c: c.update(rms_norm_eps=-1e-5), "rms_norm_eps"),
    "eos id outside vocab": (lambda c: c.update(eos_token_id=300), "300"),
    "unknown rope type": (lambda c: c["rope_parameters"].update(rope_type="yarn"), "yarn"),
    "missing vocab_size": (lambda c: c.pop("vocab_size"), "vocab_size"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_values_are_config_errors(model_dir: Path, case: str) -> None:
    edit, field = BAD_CONFIGS[case]
    _edit_config(model_dir, edit)
    _fails(model_dir, ConfigError, field, "config.json")


def test_vocab_smaller_than_the_tokenizer(model_dir: Path) -> None:
    """S8: a model whose embedding has fewer rows than the tokenizer has ids."""
    _edit_config(model_dir, lambda c: c.update(vocab_size=200))
    _edit_tensors(model_dir / "model.safetensors", lambda t: t.update(
        {"model.embed_tokens.weight": t["model.embed_tokens.weight"][:200].contiguous()}))
    _fails(model_dir, ModelFormatError, "300", "200")


def test_missing_or_broken_config_json(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{ not json")
    _fails(model_dir, ModelFormatError, "config.json")
    (model_dir / "config.json").unlink()
    _fails(model_dir, ModelFormatError, "config.json")


def test_non_llama_model_type_is_refused(model_dir: Path) -> None:
    _edit_config(model_dir, lambda c: c.update(model_type="mistral"))
    _fails(model_dir, ModelFormatError, "mistral")


# --- S7: code-bearing config keys ---------------------------------------------------------------------


def test_auto_map_and_trust_remote_code_are_ignored_with_a_warning(model_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "IMPORTED"
    module = "qkv_sentinel_modeling"
    (model_dir / f"{module}.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nclass Evil: pass\n")
    _edit_config(model_dir, lambda c: c.update(
        auto_map={"AutoConfig": f"{module}.Evil", "AutoModelForCausalLM": f"{module}.Evil"},
        trust_remote_code=True, model_file=f"{module}.py", _attn_implementation_internal=f"{module}.Evil"))
    sys.path.insert(0, str(model_dir))  # even where the module *could* be imported from, it is not
    try:
        with pytest.warns(UserWarning, match="auto_map") as record:
            loaded = load(model_dir, dtype="float32", device="cpu")
    finally:
        sys.path.remove(str(model_dir))
    msg = next(str(w.message) for w in record if "auto_map" in str(w.message))
    assert "trust_remote_code" in msg and "\n" not in msg
    assert module not in sys.modules
    assert not sentinel.exists()
    assert type(loaded.model).__module__ == "qkv.models.llama"


# --- S10: pickled weights ----------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``open(path, 'w')``: what a malicious pytorch_model.bin would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt"])
def test_pickled_weights_are_refused_without_being_read(model_dir: Path, tmp_path: Path, filename: str) -> None:
    sentinel = tmp_path / "PWNED"
    (model_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _Payload(sentinel)}, model_dir / filename)
    assert not sentinel.exists()
    msg = _fails(model_dir, ModelFormatError, filename)
    assert "safetensors" in msg
    assert not sentinel.exists()


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The refusal tests above mean something: unpickling the payload really creates its file."""
    sentinel = tmp_path / "LIVE"
    torch.save({"x": _Payload(sentinel)}, tmp_path / "payload.bin")
    torch.load(tmp_path / "payload.bin", weights_only=False)
    assert sentinel.exists()


def test_a_raw_pickle_next_to_safetensors_is_never_opened(model_dir: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "PWNED"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    load(model_dir, dtype="float32", device="cpu")
    assert not sentinel.exists()


# --- S6: sharded indexes -----------------------------------------------------------------------------


@pytest.fixture
def sharded_dir(tiny_base: SimpleNamespace, tiny: SimpleNamespace, tmp_path: Path) -> Path:
    path = tiny.write_hf_dir(tmp_path / "sharded", tiny_base.model, tiny_base.tok, max_shard_size="40KB")
    assert len(set(_index(path)["weight_map"].values())) >= 2
    return path


def _index(path: Path) -> dict[str, Any]:
    return json.loads((path / "model.safetensors.index.json").read_text())


def _rewrite_index(path: Path, edit: Callable[[dict[str, str]], None]) -> None:
    index = _index(path)
    edit(index["weight_map"])
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _first_shard(path: Path) -> str:
    return sorted(set(_index(path)["weight_map"].values()))[0]


def test_shard_outside_the_directory_is_refused(sharded_dir: Path) -> None:
    first = _first_shard(sharded_dir)
    shutil.copy(sharded_dir / first, sharded_dir.parent / "outside.safetensors")  # readable, but not ours
    _rewrite_index(sharded_dir, lambda m: m.update({k: "../outside.safetensors" for k, v in m.items() if v == first}))
    _fails(sharded_dir, ModelFormatError, "../outside.safetensors")


def test_absolute_shard_path_is_refused(sharded_dir: Path) -> None:
    first = _first_shard(sharded_dir)
    target = str((sharded_dir / first).resolve())  # an existing, valid file
    _rewrite_index(sharded_dir, lambda m: m.update({k: target for k, v in m.items() if v == first}))
    _fails(sharded_dir, ModelFormatError, target)


def test_missing_shard_is_named(sharded_dir: Path) -> None:
    first = _first_shard(sharded_dir)
    (sharded_dir / first).unlink()
    _fails(sharded_dir, ModelFormatError, first)


def test_tensor_in_two_shards_is_refused(sharded_dir: Path) -> None:
    first, second = sorted(set(_index(sharded_dir)["weight_map"].values()))[:2]
    name = sorted(load_file(str(sharded_dir / first)))[0]
    dup = load_file(str(sharded_dir / first))[name]
    _edit_tensors(sharded_dir / second, lambda t: t.update({name: dup}))
    _fails(sharded_dir, ModelFormatError, name)


def test_index_without_weight_map_is_refused(sharded_dir: Path) -> None:
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _fails(sharded_dir, ModelFormatError, "weight_map")


# --- S11: symlinks -----------------------------------------------------------------------------------


def test_symlink_to_a_file_outside_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Policy (qkv.weights.hf): weight files are resolved, and one that lands outside the directory is
    refused — a model directory cannot make qkv read an arbitrary file."""
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(model_dir / "model.safetensors", outside)
    os.symlink(outside, model_dir / "model.safetensors")
    _fails(model_dir, ModelFormatError, "outside")


def test_symlink_inside_the_directory_is_allowed(model_dir: Path) -> None:
    (model_dir / "weights").mkdir()
    shutil.move(model_dir / "model.safetensors", model_dir / "weights" / "real.safetensors")
    os.symlink(Path("weights") / "real.safetensors", model_dir / "model.safetensors")
    assert load(model_dir, dtype="float32", device="cpu").format == "hf"


# --- S1: broken safetensors files --------------------------------------------------------------------


def _truncated(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _header_longer_than_file(b: bytes) -> bytes:
    return struct.pack("<Q", len(b) * 2) + b[8:]


def _header(raw: bytes) -> Callable[[bytes], bytes]:
    return lambda b: struct.pack("<Q", len(raw)) + raw + b[8 + struct.unpack("<Q", b[:8])[0]:]


BROKEN_SAFETENSORS = {
    "truncated": _truncated,
    "header length > file": _header_longer_than_file,
    "header > 100 MB": lambda b: struct.pack("<Q", 200 * 2**20) + b[8:],
    "header not UTF-8": _header(b"\xff\xfe\xfd" + b" " * 13),
    "header not an object": _header(b"[1, 2, 3]       "),
    "header not JSON": _header(b"{ this is not js"),
    "empty file": lambda b: b"",
}


@pytest.mark.parametrize("case", list(BROKEN_SAFETENSORS))
def test_broken_safetensors_is_a_typed_error(model_dir: Path, case: str) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(BROKEN_SAFETENSORS[case](path.read_bytes()))
    _fails(model_dir, ModelFormatError, "model.safetensors", "SafetensorError")


# --- names and files that are not models -------------------------------------------------------------


def test_unknown_name_lists_the_embedded_models() -> None:
    msg = _fails("no-such-model-xyz", ConfigError, "no-such-model-xyz")
    for name in embedded_names():
        assert name in msg


def test_random_bytes_are_not_a_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("random.gguf", "random.bin", "random"):
        path = tmp_path / name
        path.write_bytes(b"NOTG" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        _fails(path, ModelFormatError, str(path))


def test_truncated_gguf_is_a_typed_error(tiny_base: SimpleNamespace, tmp_path: Path) -> None:
    data = tiny_base.gguf.read_bytes()
    for cut in (3, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        _fails(path, ModelFormatError, path.name)


def test_directory_without_weights_is_named(tmp_path: Path, model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    _fails(model_dir, ModelFormatError, "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(empty, ModelFormatError, "config.json")


def test_no_warning_for_a_clean_directory(model_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(model_dir, dtype="float32", device="cpu")
