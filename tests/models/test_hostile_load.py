"""qkv.load on hostile model files (issue #16; SECURITY.md): every refusal is a typed one-line error, in
under a second and 256 MiB, decided from the config and the file's tensor table before anything is built.

Each case runs in a forked child (fuzz.engine.run_one) so that its time and peak memory are its own.
Cases found by the fuzz campaign (python -m fuzz) are marked "fuzz:" with the reader that found them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from fuzz.engine import Outcome, run_one
from fuzz.gguf_doc import FLOAT32, KV, STRING, UINT32, read_doc, serialize
from qkv.config import LlamaConfig
from qkv.errors import ConfigError, ModelFormatError, TokenizerError
from qkv.load import llama_shapes, load
from qkv.models.llama import LlamaForCausalLM


@pytest.fixture
def model_dir(tiny_base: SimpleNamespace, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_base.hf_dir, tmp_path / "model"))


def refused(tmp_path: Path, path: Path, kind: type = ModelFormatError, *must_name: str) -> Outcome:
    """qkv.load(path) in a child: a typed, one-line ``kind`` naming ``must_name``, < 1 s, < 256 MiB."""
    out = run_one(lambda: load(path, dtype="float32", device="cpu"), workdir=tmp_path / "fork")
    print(out)
    assert out.kind == "typed", out
    assert out.detail.startswith(kind.__name__), out.detail
    assert out.seconds < 1.0 and out.rss_mb < 256, out
    for name in must_name:
        assert name in out.detail, (name, out.detail)
    return out


def edit_config(model_dir: Path, **values: Any) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(values)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def gguf_with(tiny_base: SimpleNamespace, tmp_path: Path, edit: Callable[[Any], None]) -> Path:
    """The tiny GGUF (written by gguf-py) with its structure edited, rewritten by fuzz.gguf_doc."""
    doc = read_doc(tiny_base.gguf)
    edit(doc)
    path = tmp_path / "edited.gguf"
    path.write_bytes(serialize(doc))
    return path


def set_kv(doc: Any, key: str, value: Any, vtype: int = UINT32) -> None:
    kv = doc.kv(key)
    if kv is None:
        doc.kvs.append(KV(key.encode(), vtype, value))
    else:
        kv.vtype, kv.value = vtype, value


# --- the expected tensor table is the module's own -----------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, dict(tie_word_embeddings=False), dict(attention_bias=True, mlp_bias=True),
                                   dict(num_key_value_heads=1, head_dim=16)])
def test_llama_shapes_match_the_module(extra: dict) -> None:
    cfg = LlamaConfig(**{**dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2), **extra})
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert llama_shapes(cfg) == expected


# --- hangs and memory: a config that describes far more than the file holds ---------------------------------


@pytest.mark.parametrize("layers", [100_000, 2**31])
def test_gguf_with_absurd_layer_count_is_refused_from_the_table(tiny_base: SimpleNamespace, tmp_path: Path,
                                                                layers: int) -> None:
    """Was: a model of 100,000 layers built before the tensors were compared (minutes); fuzz (gguf): 2^31
    layers made the layer check itself build list(range(2^31))."""
    path = gguf_with(tiny_base, tmp_path, lambda d: set_kv(d, "llama.block_count", layers))
    refused(tmp_path, path, ModelFormatError, f"num_hidden_layers={layers}", "layers 0..1")


def test_hf_dir_with_absurd_layer_count_is_refused(model_dir: Path, tmp_path: Path) -> None:
    edit_config(model_dir, num_hidden_layers=100_000)
    refused(tmp_path, model_dir, ModelFormatError, "num_hidden_layers=100000")


@pytest.mark.parametrize("head_dim", [2**20, 2**30])
def test_huge_head_dim_is_refused_before_rope_tables(tiny_base: SimpleNamespace, model_dir: Path, tmp_path: Path,
                                                     head_dim: int) -> None:
    """Was: RoPE frequencies (head_dim/2 float64) allocated on the CPU before the shapes were checked."""
    edit_config(model_dir, head_dim=head_dim)
    refused(tmp_path, model_dir, ModelFormatError, "wrong shape", str(head_dim * 4))
    path = gguf_with(tiny_base, tmp_path, lambda d: set_kv(d, "llama.attention.key_length", head_dim))
    refused(tmp_path, path, ModelFormatError, "wrong shape")


def test_huge_rope_freqs_tensor_is_refused_before_it_is_read(tiny_base: SimpleNamespace, tmp_path: Path) -> None:
    def add(doc: Any) -> None:
        from fuzz.gguf_doc import TensorInfo

        doc.tensors.append(TensorInfo(b"rope_freqs.weight", [2**20], 0, len(doc.data)))
        doc.data += b"\0" * (4 * 2**20)

    refused(tmp_path, gguf_with(tiny_base, tmp_path, add), ModelFormatError, "rope_freqs.weight", "1048576")


def test_gguf_vocabulary_larger_than_the_model_is_refused_before_the_tokenizer(tiny_base: SimpleNamespace,
                                                                               tmp_path: Path) -> None:
    path = gguf_with(tiny_base, tmp_path, lambda d: set_kv(d, "llama.vocab_size", 10))
    refused(tmp_path, path, ModelFormatError, "wrong shape")


# --- untyped errors -------------------------------------------------------------------------------------------


def test_integer_tensor_where_a_weight_belongs_is_typed(model_dir: Path, tmp_path: Path) -> None:
    """Was: RuntimeError from load_state_dict (an int64 tensor cannot be a Parameter)."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].long()
    save_file(tensors, str(model_dir / "model.safetensors"))
    refused(tmp_path, model_dir, ModelFormatError, "model.norm.weight I64", "floating-point")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_deeply_nested_json_is_typed(model_dir: Path, tmp_path: Path, name: str) -> None:
    """Was: RecursionError from json.loads (and nesting below the recursion limit reached the loaders)."""
    for depth in (100, 100_000):
        (model_dir / name).write_text('{"a": ' + "[" * depth + "]" * depth + "}")
        kind = ModelFormatError if name == "config.json" else TokenizerError
        refused(tmp_path, model_dir, kind, name, "nested deeper than 64")


@pytest.mark.parametrize("content, says", [
    ('{"vocab_size": ' + "9" * 5000 + "}", "4300 digits"),  # Python's int-from-string limit, a ValueError
    ("{" + " " * (5 * 2**20) + "}", "larger than 4 MiB"),
    ('{"a": 1, "a": 2', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_config_files_are_typed(model_dir: Path, tmp_path: Path, content: str, says: str) -> None:
    (model_dir / "config.json").write_text(content)
    refused(tmp_path, model_dir, ModelFormatError, "config.json", says)


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "/proc/self/environ"])
def test_config_that_never_ends_is_refused_unread(model_dir: Path, tmp_path: Path, target: str) -> None:
    """Was: MemoryError reading an endless file. A link outside the directory is refused unread."""
    (model_dir / "config.json").unlink()
    os.symlink(target, model_dir / "config.json")
    refused(tmp_path, model_dir, ModelFormatError, "outside the model directory")


def test_fifo_or_directory_as_config_is_refused_without_blocking(model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")  # opening a FIFO for reading would wait for a writer forever
    refused(tmp_path, model_dir, ModelFormatError, "not a regular file")
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").mkdir()
    refused(tmp_path, model_dir, ModelFormatError, "not a regular file")


def test_non_utf8_chat_template_file_is_typed(model_dir: Path, tmp_path: Path) -> None:
    """Was: UnicodeDecodeError from chat_template.jinja."""
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model_dir / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    refused(tmp_path, model_dir, TokenizerError, "chat_template.jinja", "not UTF-8")


@pytest.mark.parametrize("values, says", [
    (dict(rope_theta=10**400), "rope_theta"),  # math.isfinite(int) raises OverflowError
    (dict(rms_norm_eps=10**400), "rms_norm_eps"),
    (dict(vocab_size=10**30), "vocab_size"),
    (dict(rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": "x"}), "rope_scaling"),
    (dict(rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": [1],
                                              "high_freq_factor": 4.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_theta": 10000.0, "x": [[[[1]]]]}, rope_scaling={"x": [[[[2]]]]}), "disagree"),
])
def test_config_values_the_checks_did_not_expect_are_config_errors(model_dir: Path, tmp_path: Path,
                                                                   values: dict, says: str) -> None:
    edit_config(model_dir, **values)
    refused(tmp_path, model_dir, ConfigError, says)


def test_weight_map_with_non_string_shards_is_typed(tiny_base: SimpleNamespace, tiny: SimpleNamespace,
                                                    tmp_path: Path) -> None:
    """fuzz (safetensors): TypeError 'unhashable type: list' from a weight_map value that is a list."""
    path = tiny.write_hf_dir(tmp_path / "sharded", tiny_base.model, tiny_base.tok, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = ["model-00001-of-00002.safetensors"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(tmp_path, path, ModelFormatError, "weight_map")


def test_gguf_chat_template_nested_too_deep_is_typed(tiny_base: SimpleNamespace, tmp_path: Path) -> None:
    """Was: IndentationError / SyntaxError from compiling a deeply nested template out of GGUF metadata."""
    from qkv.errors import TemplateError

    for source in ("{% if true %}" * 120 + "x" + "{% endif %}" * 120,
                   "{% for i in [1] %}" * 30 + "x" + "{% endfor %}" * 30):
        path = gguf_with(tiny_base, tmp_path, lambda d: set_kv(d, "tokenizer.chat_template", source.encode(), STRING))
        refused(tmp_path, path, TemplateError, "nests blocks too deeply")


def test_nan_weights_fail_typed_at_generation(tiny_base: SimpleNamespace, tmp_path: Path) -> None:
    """A file whose weights are NaN loads (it is well-formed) and generation says so, typed."""
    def poison(doc: Any) -> None:
        t = next(t for t in doc.tensors if t.name == b"output_norm.weight")
        n = t.dims[0]
        doc.data = doc.data[:t.offset] + struct.pack("<f", float("nan")) * n + doc.data[t.offset + 4 * n:]

    path = gguf_with(tiny_base, tmp_path, poison)

    def generate() -> None:
        from qkv.generate.loop import generate_ids
        from qkv.generate.sampling import SamplingOptions

        loaded = load(path, device="cpu")
        list(generate_ids(loaded.model, [1, 2], SamplingOptions(temperature=0), max_new_tokens=2))

    out = run_one(generate, workdir=tmp_path / "fork")
    assert out.kind == "typed" and "non-finite logits" in out.detail, out


# --- the Hugging Face hub cache layout --------------------------------------------------------------------------


def hub_cache(model_dir: Path, root: Path) -> Path:
    """``models--ORG--NAME/snapshots/REV/`` whose files are relative links into ``../../blobs/`` (as
    huggingface_hub writes them)."""
    repo = root / "hub" / "models--qkv-test--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(model_dir.iterdir())):
        shutil.copy(f, blobs / f"blob{i:02d}")
        os.symlink(Path("..") / ".." / "blobs" / f"blob{i:02d}", snap / f.name)
    return snap


def test_hub_cache_snapshot_loads(model_dir: Path, tmp_path: Path) -> None:
    snap = hub_cache(model_dir, tmp_path)
    assert all((snap / n).is_symlink() for n in ("config.json", "model.safetensors", "tokenizer.json"))
    loaded = load(snap, dtype="float32", device="cpu")
    assert loaded.format == "hf" and loaded.chat_template is not None


def test_hub_cache_link_outside_its_repository_is_refused(model_dir: Path, tmp_path: Path) -> None:
    snap = hub_cache(model_dir, tmp_path)
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", other / "stolen")
    (snap / "model.safetensors").unlink()
    os.symlink(other / "stolen", snap / "model.safetensors")
    refused(tmp_path, snap, ModelFormatError, "outside the model directory")
    (snap / "model.safetensors").unlink()
    blob = sorted(p.name for p in model_dir.iterdir()).index("model.safetensors")
    os.symlink(Path("..") / ".." / "blobs" / f"blob{blob:02d}", snap / "model.safetensors")  # back inside
    (snap / "tokenizer.json").unlink()
    os.symlink("/etc/hostname", snap / "tokenizer.json")
    refused(tmp_path, snap, TokenizerError, "outside the model directory")


def test_a_directory_merely_named_like_the_cache_gets_no_wider_root(model_dir: Path, tmp_path: Path) -> None:
    """Only ``models--*/snapshots/REV`` widens the allowed root, and only to that repository folder."""
    fake = tmp_path / "snapshots" / "rev"
    fake.parent.mkdir()
    shutil.copytree(model_dir, fake)
    (tmp_path / "outside.safetensors").write_bytes((fake / "model.safetensors").read_bytes())
    (fake / "model.safetensors").unlink()
    os.symlink(tmp_path / "outside.safetensors", fake / "model.safetensors")
    refused(tmp_path, fake, ModelFormatError, "outside the model directory")


def test_float_config_keys_in_gguf_are_typed(tiny_base: SimpleNamespace, tmp_path: Path) -> None:
    path = gguf_with(tiny_base, tmp_path, lambda d: set_kv(d, "llama.rope.freq_base", float("nan"), FLOAT32))
    refused(tmp_path, path, ConfigError, "rope_theta")


def test_a_value_with_line_breaks_keeps_the_message_on_one_line(model_dir: Path, tmp_path: Path) -> None:
    """fuzz (config): model_type "<|im_start|>system\\nevil" was quoted raw, breaking the one-line rule."""
    edit_config(model_dir, model_type="<|im_start|>system\nevil")
    out = refused(tmp_path, model_dir, ModelFormatError, "model_type", "\\n")
    assert "\n" not in out.detail


def test_every_qkv_error_prints_on_one_line() -> None:
    """The rule holds by construction: a line break inside any QkvError's text is shown as \\n."""
    err = TokenizerError("loading failed: line one\nline two\r\nthree")
    assert str(err) == "loading failed: line one\\nline two\\r\\nthree"
