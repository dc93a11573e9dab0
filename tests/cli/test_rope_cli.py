"""``qkv rope``: the frequency table equals θ_i = base^(-2i/D) written here in float64 (base and D read from the
GGUF with gguf-py); with Llama-3 scaling, the frequencies equal transformers' ``ROPE_INIT_FUNCTIONS["llama3"]``
and the Llama 3 reference formula written here (HF directory and GGUF with its rope_freqs tensor); the rotated
q·k equals a float64 rotation written here, for every distance and any key position; the PNG decodes; bad
input is one line, exit 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from qkv.cli.main import main
from qkv.explain.rope_view import rope_view
from tests.models.conftest import VARIANTS, random_llama, tiny_tokenizer, write_gguf, write_hf_dir


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["rope", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv: str) -> dict:
    code, out, err = _run(capsys, *argv, "--format", "json", "--device", "cpu")
    assert code == 0, err
    return json.loads(out)


# --- independent references ---------------------------------------------------------------------------------


def inv_freq64(base: float, dim: int) -> list[float]:
    """θ_i = base^(-2i/D), i < D/2 (RoFormer eq. 15), in Python floats."""
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def llama3_inv_freq64(base: float, dim: int, factor: float, low: float, high: float, original: int) -> list[float]:
    """Meta's ``apply_scaling`` (llama-models, Llama 3.1): keep short wavelengths, divide long ones by
    ``factor``, interpolate smoothly between ``original/high`` and ``original/low`` tokens."""
    out = []
    for f in inv_freq64(base, dim):
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out


def rotated_dot64(q: list[float], k: list[float], inv: list[float], qpos: int, kpos: int) -> float:
    """Rotate-half RoPE in float64: pair (x[i], x[i + D/2]) turned by pos·θ_i, then the dot product."""
    half = len(q) // 2

    def rot(x, pos):
        out = [0.0] * len(x)
        for i in range(half):
            a, b, ang = x[i], x[i + half], pos * inv[i]
            out[i], out[i + half] = a * math.cos(ang) - b * math.sin(ang), a * math.sin(ang) + b * math.cos(ang)
        return out
    return sum(x * y for x, y in zip(rot(q, qpos), rot(k, kpos)))


# --- SmolLM2 ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_meta(smollm2) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(smollm2.source))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    return {"base": float(field("llama.rope.freq_base")),
            "dim": int(field("llama.embedding_length")) // int(field("llama.attention.head_count"))}


def test_smollm2_table_equals_the_formula(smollm2, smol_meta):
    d = rope_view(smollm2, max_distance=8).to_dict()
    ref = inv_freq64(smol_meta["base"], smol_meta["dim"])
    assert d["head_dim"] == smol_meta["dim"] and d["rope_theta"] == smol_meta["base"] and d["rope_scaling"] is None
    got = [p["inv_freq"] for p in d["pairs"]]
    assert got == pytest.approx(ref, rel=1e-12) and [p["inv_freq_base"] for p in d["pairs"]] == pytest.approx(ref)
    assert [p["wavelength"] for p in d["pairs"]] == pytest.approx([2 * math.pi / f for f in ref], rel=1e-12)
    assert [p["dims"] for p in d["pairs"]] == [[i, i + smol_meta["dim"] // 2] for i in range(smol_meta["dim"] // 2)]


@pytest.mark.parametrize("vectors,offset", [("ones", 0), ("random", 0), ("random", 5000)])
def test_smollm2_dot_equals_a_float64_rotation(smollm2, smol_meta, vectors, offset):
    """Against the float64 rotation at the absolute positions offset + r and offset (so this also checks that
    only the distance counts); the model rotates in float32, hence the tolerance."""
    v = rope_view(smollm2, max_distance=300, vectors=vectors, seed=7, offset=offset)
    inv = inv_freq64(smol_meta["base"], smol_meta["dim"])
    q, k = v.q.tolist(), v.k.tolist()
    if vectors == "ones":
        assert q == k == [1.0] * smol_meta["dim"]
    ref = torch.tensor([rotated_dot64(q, k, inv, offset + r, offset) for r in range(301)], dtype=torch.float64)
    scale = sum(abs(x) for x in q) * max(abs(x) for x in k)
    torch.testing.assert_close(v.dots, ref, rtol=0, atol=2e-6 * scale * (1 + offset / 1000))
    if vectors == "ones":
        assert float(v.dots[0]) == pytest.approx(smol_meta["dim"])


def test_smollm2_cli_json_and_png(capsys, tmp_path):
    png = tmp_path / "rope.png"
    code, out, err = _run(capsys, "--format", "json", "--png", str(png), "-n", "40", "--device", "cpu")
    assert code == 0 and err.startswith("[qkv: wrote ") and str(png) in err
    d = json.loads(out)
    assert d["model"] == "smollm2" and d["dot"]["distances"] == list(range(41)) and len(d["dot"]["values"]) == 41
    from matplotlib.image import imread

    img = imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.shape[2] in (3, 4)


# --- Llama-3 scaling: HF directory and GGUF -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> SimpleNamespace:
    tok = tiny_tokenizer()
    model = random_llama(tok, seed=4, **VARIANTS["llama3"])
    root = tmp_path_factory.mktemp("rope")
    gguf = root / "llama3.gguf"
    write_gguf(gguf, model, tok)
    return SimpleNamespace(model=model, hf=write_hf_dir(root / "llama3-hf", model, tok), gguf=gguf)


@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_llama3_scaling_equals_transformers_and_the_reference(capsys, llama3, which):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = _json(capsys, "--model", str(getattr(llama3, which)), "-n", "16")
    cfg = llama3.model.config
    rs = VARIANTS["llama3"]["rope_scaling"]
    dim = cfg.hidden_size // cfg.num_attention_heads
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ref = llama3_inv_freq64(VARIANTS["llama3"]["rope_theta"], dim, rs["factor"], rs["low_freq_factor"],
                            rs["high_freq_factor"], rs["original_max_position_embeddings"])
    got = [p["inv_freq"] for p in d["pairs"]]
    assert got == pytest.approx(hf_inv.double().tolist(), rel=2e-6)  # transformers computes in float32
    # the HF config's parameters are applied in float64; the GGUF's are float32 divisors from its rope_freqs
    assert got == pytest.approx(ref, rel=1e-12 if which == "hf" else 2e-7)
    assert [p["inv_freq_base"] for p in d["pairs"]] == pytest.approx(inv_freq64(VARIANTS["llama3"]["rope_theta"], dim))
    assert any(p["scale"] > 1.5 for p in d["pairs"]) and any(p["scale"] == pytest.approx(1.0) for p in d["pairs"])
    if which == "hf":
        assert d["rope_scaling"]["factor"] == rs["factor"] and not d["freq_factors"]
    else:
        assert d["rope_scaling"] is None and d["freq_factors"]


def test_text_view_shows_scaling_and_the_dot_product(capsys, llama3):
    code, out, err = _run(capsys, "--model", str(llama3.hf), "-n", "100", "--device", "cpu")
    assert code == 0 and err == ""
    for part in ("RoPE on q and k, head dim D = 16", "llama3 scaling: factor 8", "θ_i scaled", "wavelength (tokens)",
                 "q·k after rotation: q = k = (1, …, 1)", "r = 0..100", "r = 0..63", "│"):
        assert part in out, part
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["0"] and "16.000" in line]
    assert rows, "the r = 0 row shows q·k = D for all-ones vectors"


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["--model", "minilm"], "no rotary position embedding"),
    (["--model", "no-such-model"], "no model 'no-such-model'"),
    (["--max-distance", "0"], "--max-distance"),
    (["--max-distance", "100000000"], "--max-distance"),
    (["--offset", "-1"], "--offset"),
])
def test_bad_input_one_line_exit_2(capsys, argv, needle):
    code, out, err = _run(capsys, *argv, "--device", "cpu")
    assert code == 2 and out == ""
    assert err.startswith("qkv: error: ") and err.count("\n") == 1 and needle in err, err


def test_real_process_exit_code():
    p = subprocess.run([sys.executable, "-m", "qkv", "rope", "--max-distance", "0"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.startswith("qkv: error:") and p.stderr.count("\n") == 1, p.stderr
