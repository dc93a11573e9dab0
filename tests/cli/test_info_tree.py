"""``qkv info --tree``: parameter counts equal the loaded state dict (the tie counted once) and transformers'
``num_parameters()`` of the same architecture; the split q/k/v and gate/up tensors have transformers' names and
shapes; file bytes equal what gguf-py's reader and the raw safetensors header say; runtime bytes are numel ×
the dtype's element size, and int4 bytes equal the buffers qkv actually packs; identical layers collapse into
one ×N entry and differing ones do not; a golden layout for a tiny model; bad input is one line, exit 2.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qkv
from qkv.cli.main import main
from qkv.explain.anatomy import anatomy
from qkv.nn.quant import QuantizedLinear
from tests.models.conftest import VARIANTS, random_llama, tiny_tokenizer, write_gguf, write_hf_dir

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny random transformers Llama (tied) as an HF directory and a Q4_0 GGUF; an untied one with biases."""
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("tree")
    model = random_llama(tok, seed=1)
    untied = random_llama(tok, seed=2, **VARIANTS["untied_bias"])
    q4 = root / "tiny-q4.gguf"
    write_gguf(q4, model, tok, weight_type="Q4_0")
    return SimpleNamespace(tok=tok, model=model, untied=untied, hf=write_hf_dir(root / "tiny-llama", model, tok),
                           hf_untied=write_hf_dir(root / "tiny-untied", untied, tok), q4=q4, root=root)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["info", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _tree_json(capsys, model: str, *extra: str) -> dict:
    code, out, err = _run(capsys, model, "--tree", "--format", "json", "--device", "cpu", *extra)
    assert code == 0 and err == "", err
    return json.loads(out)


def _unique_state_numel(model: torch.nn.Module) -> int:
    """Sum of numel over the state dict, each tensor object once (a tied matrix is one Parameter)."""
    return sum(p.numel() for p in {id(p): p for p in model.state_dict(keep_vars=True).values()}.values())


def _leaves(node: dict, copies: int = 1):
    """(tensor dict, copies) for every tensor in the JSON tree, expanded by the ×N of the groups above it."""
    copies *= node["repeat"]
    for t in node["tensors"]:
        yield t, copies
    for c in node["children"]:
        yield from _leaves(c, copies)


def _expanded(tree: dict, layers: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor, {i} expanded to each layer index of its group."""
    out = {}

    def walk(node, indices):
        idx = node["layers"] or indices
        for t in node["tensors"]:
            for i in (idx if "{i}" in t["name"] else [None]):
                out[t["name"].replace("{i}", str(i))] = tuple(t["shape"])
        for c in node["children"]:
            walk(c, idx)
    walk(tree, list(range(layers)))
    return out


# --- parameter counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["hf", "q4", "hf_untied"])
def test_counts_equal_state_dict_and_transformers(capsys, tiny, which):
    path = getattr(tiny, which)
    d = _tree_json(capsys, str(path))
    ref = tiny.untied if which == "hf_untied" else tiny.model
    loaded = qkv.load(path, dtype="float32", device="cpu")  # its state dict holds every tensor (a compact one doesn't)
    total = d["totals"]["parameters"]
    assert total == _unique_state_numel(loaded.model) == ref.num_parameters()
    assert total == d["tree"]["parameters"] == sum(t["parameters"] * n for t, n in _leaves(d["tree"]))
    # the split q/k/v, gate/up have transformers' names and shapes (a tied lm_head is not a new tensor)
    hf = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = _expanded(d["tree"], ref.config.num_hidden_layers)
    if ref.config.tie_word_embeddings:
        hf.pop("lm_head.weight")
        assert d["totals"]["tied"] == [{"name": "lm_head.weight", "same_as": "model.embed_tokens.weight",
                                        "parameters_not_counted_again": ref.lm_head.weight.numel()}]
        ours.pop("lm_head.weight")
    assert ours == hf


def test_smollm2_counts_equal_transformers(smollm2):
    """SmolLM2: the total equals the state dict (tie once) and transformers' LlamaForCausalLM built from the
    same config (on the meta device: no memory, no weights); every tensor name and shape agrees."""
    import transformers

    a = anatomy(smollm2)
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smollm2.config.to_dict()))
    total = a.totals()["parameters"]
    assert total == _unique_state_numel(smollm2.model) == ref.num_parameters()
    hf = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    ours = _expanded(a.to_dict()["tree"], smollm2.config.num_hidden_layers)
    ours.pop("lm_head.weight")
    assert ours == hf
    layers = [c for c in a.root.children if c.repeat > 1]
    assert len(layers) == 1 and layers[0].repeat == 30 and layers[0].indices == tuple(range(30))


def test_minilm_tree_is_its_own(capsys):
    """BERT (post-norm): its own components and diagram; the total equals transformers' BertModel."""
    import transformers

    d = _tree_json(capsys, "minilm")
    loaded = qkv.load("minilm", device="cpu")
    cfg = json.loads((Path(loaded.source) / "config.json").read_text())
    with torch.device("meta"):
        ref = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=True)
    assert d["totals"]["parameters"] == _unique_state_numel(loaded.model) == ref.num_parameters()
    assert d["totals"]["tied"] == [] and d["numbers"]["kind"] == "bert"
    names = [c["name"] for c in d["tree"]["children"]]
    assert names == ["embeddings", "encoder.layer.0-5", "pooler"]
    layer = d["tree"]["children"][1]
    assert layer["repeat"] == 6 and [c["name"] for c in layer["children"]] == [
        "attention", "attention_layernorm", "intermediate.dense", "output"]
    code, out, _ = _run(capsys, "minilm", "--tree", "--device", "cpu")
    assert code == 0 and "encoder layer (post-norm)" in out and "LayerNorm" in out and "RoPE" in out


# --- bytes --------------------------------------------------------------------------------------------------


def test_runtime_bytes_are_numel_times_element_size(capsys, tiny):
    d = _tree_json(capsys, str(tiny.q4))
    size = {n: torch.empty((), dtype=getattr(torch, n)).element_size() for n in ("float32", "bfloat16", "float16")}
    totals = dict.fromkeys(size, 0)
    for t, n in _leaves(d["tree"]):
        for dt, s in size.items():
            assert t["bytes"][dt] == t["parameters"] * s, (t["name"], dt)
            totals[dt] += t["bytes"][dt] * n
    assert {k: d["totals"]["bytes"][k] for k in size} == totals
    assert totals["float32"] == 4 * d["totals"]["parameters"]


def test_int4_bytes_equal_the_buffers_qkv_packs(capsys, tiny):
    """The int4 column (a formula) equals the packed codes + scales/zeros of the QuantizedLinear modules the
    loader builds for a Q4_0 GGUF on the CPU (dtype auto)."""
    d = _tree_json(capsys, str(tiny.q4))
    loaded = qkv.load(tiny.q4, device="cpu")
    packed = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear) and m.kind == "int4"]
    assert packed, "the loader should attach int4 copies to a Q4_0 file on the CPU"
    held = sum(m.packed.nbytes + m.scales_zeros.nbytes for m in packed)
    assert d["totals"]["bytes"]["int4"] == held
    assert d["held"]["buffer_bytes"] == sum(b.nbytes for b in {id(b): b for b in loaded.model.buffers()}.values())


def test_gguf_file_bytes_equal_gguf_py(capsys, tiny):
    """Per tensor type and bytes as gguf-py's own reader sees the file; the totals add them up."""
    from gguf import GGUFReader

    d = _tree_json(capsys, str(tiny.q4))
    r = GGUFReader(str(tiny.q4))
    by_gguf = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in r.tensors}
    leaves = list(_leaves(d["tree"]))
    assert sum(t["file_bytes"] * n for t, n in leaves if t["tied_to"] is None) == sum(b for _, b in by_gguf.values())
    assert d["totals"]["file_bytes"] == sum(b for _, b in by_gguf.values())
    q = next(t for t, _ in leaves if t["name"] == "model.layers.{i}.self_attn.q_proj.weight")
    assert (q["file_type"], q["file_bytes"]) == by_gguf["blk.0.attn_q.weight"] and q["file_type"] == "Q4_0"
    assert q["stored_as"] == "qkv_proj[0:64]"  # fused in the loaded model (auto on the CPU)
    assert d["files"]["file_bytes"] == tiny.q4.stat().st_size


def _safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_safetensors_file_bytes_equal_the_header(capsys, tiny):
    d = _tree_json(capsys, str(tiny.hf_untied))
    header = {k: v for k, v in _safetensors_header(tiny.hf_untied / "model.safetensors").items() if k != "__metadata__"}
    ours = {}
    for t, _ in _leaves(d["tree"]):
        for i in range(tiny.untied.config.num_hidden_layers):
            ours[t["name"].replace("{i}", str(i))] = (t["file_type"], t["file_bytes"])
    assert ours == {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


def test_layers_that_differ_are_not_collapsed(capsys, tiny, tmp_path):
    """Three layers, the middle one's q_proj stored as BF16: layers 0 and 2 collapse (×2), layer 1 stands alone."""
    from safetensors.torch import load_file, save_file

    model = random_llama(tiny.tok, seed=3, num_hidden_layers=3)
    path = write_hf_dir(tmp_path / "mixed", model, tiny.tok)
    st = load_file(str(path / "model.safetensors"))
    st["model.layers.1.self_attn.q_proj.weight"] = st["model.layers.1.self_attn.q_proj.weight"].bfloat16()
    save_file(st, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = _tree_json(capsys, str(path))
    groups = [(c["name"], c["repeat"], c["layers"]) for c in d["tree"]["children"] if c["layers"]]
    assert groups == [("model.layers.0,2", 2, [0, 2]), ("model.layers.1", 1, [1])]
    assert d["totals"]["parameters"] == model.num_parameters()
    q = 64 * 64
    assert d["totals"]["file_bytes"] == 4 * model.num_parameters() - 2 * q


def test_training_run_tree(capsys, tmp_path):
    """A `qkv train` encoder–decoder run: no file types, no diagram, the same counting rule; plain `qkv info`
    describes it too."""
    from qkv.train import TrainConfig, train

    cfg = TrainConfig(task="reverse", out=str(tmp_path / "run"), max_steps=2, batch_size=4, d_model=32, n_heads=2,
                      n_layers=1, d_ff=64, n_train=20, n_val=4, n_test=4, eval_every=2, save_every=2, eval_size=4,
                      samples=1, log_every=1, warmup_steps=1)
    train(cfg, progress=False)
    capsys.readouterr()
    d = _tree_json(capsys, cfg.out)
    loaded = qkv.load(cfg.out, device="cpu")
    assert d["totals"]["parameters"] == _unique_state_numel(loaded.model) and d["totals"]["file_bytes"] is None
    assert d["numbers"]["kind"] == "other" and d["numbers"]["d_model"] == 32
    code, out, err = _run(capsys, cfg.out, "--tree", "--device", "cpu")
    assert code == 0 and "cross_attn" in out and "no diagram for EncoderDecoder" in out, err
    code, out, err = _run(capsys, cfg.out, "--format", "json", "--device", "cpu")
    assert code == 0 and json.loads(out)["parameters"] == d["totals"]["parameters"], err


# --- the layout, and bad input ------------------------------------------------------------------------------


def test_golden_tree_layout(capsys, tiny):
    """The terminal layout for the tiny model (regenerate with QKV_REGEN_GOLDEN=1 after a reviewed change).
    Every number in it is an integer count or bytes formatted from one; the size of the file on disk (its
    header depends on the writer's version) is masked."""
    code, out, err = _run(capsys, str(tiny.hf), "--tree", "--device", "cpu")
    assert code == 0 and err == "", err
    out = re.sub(r"file: \S+ \S+ on disk", "file: <size> on disk", out)
    golden = GOLDEN / "info_tree_tiny.txt"
    if os.environ.get("QKV_REGEN_GOLDEN"):
        golden.write_text(out, encoding="utf-8")
    assert out == golden.read_text(encoding="utf-8")


def test_text_names_every_component(capsys, tiny):
    code, out, _ = _run(capsys, str(tiny.q4), "--tree", "--device", "cpu")
    assert code == 0
    for part in ("embed_tokens", "model.layers.0-1 ×2", "input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                 "post_attention_layernorm", "gate_proj", "up_proj", "down_proj", "model.norm", "lm_head",
                 "= model.embed_tokens", "Q4_0", "tied:", "fused:", "N = 2 × decoder layer", "GQA",
                 "H = 4 query heads, KV = 2", "I 128", "context 256", "RoPE θ = 10,000", "V = 300", "logits"):
        assert part in out, part


@pytest.mark.parametrize("argv,needle", [
    (["no-such-model", "--tree"], "no model 'no-such-model'"),
    (["--tree", "--model", "/nonexistent/x.gguf"], "no model"),
])
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and needle in err, err


def test_corrupt_file_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    code, out, err = _run(capsys, str(bad), "--tree")
    assert code == 2 and out == "" and err.startswith("qkv: error: ") and err.count("\n") == 1, err


def test_real_process_exit_code():
    p = subprocess.run([sys.executable, "-m", "qkv", "info", "no-such-model", "--tree"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.startswith("qkv: error:") and p.stderr.count("\n") == 1, p.stderr
