"""The native dequantiser (qkv.weights.native, dequant.cpp): built with the machine's C++ compiler into a
temporary cache, bitwise the eager dequantiser's numbers for every block kind and dtype — random blocks,
every float16 factor, the edge values — used by a prompt's exact weights with the same logits bit for bit,
and a damaged, wrong or missing library never used; build failures are one line and leave no file."""

from __future__ import annotations

import ctypes
import json
import platform
from pathlib import Path

import pytest
import torch

import qkv
from qkv.errors import ConfigError
from qkv.weights import native
from qkv.weights.int4 import TORCH_DEQUANT, dequantize_into

from tests.models.conftest import tiny_gguf

KINDS = sorted(native.KINDS)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory) -> Path:
    """A cache folder holding the library, built once for the module (about a second)."""
    cache = tmp_path_factory.mktemp("native-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKV_CACHE_DIR", str(cache))
        seconds = native.build()
        assert seconds is not None and native.library_path().parent == cache / "native"
        assert native.build() is None  # cached: not built again
    return cache


@pytest.fixture
def use(lib_dir, monkeypatch) -> Path:
    monkeypatch.setenv("QKV_CACHE_DIR", str(lib_dir))
    monkeypatch.setenv("QKV_COMPILE", "auto")  # the suite's default is 0 (tests/conftest.py)
    return lib_dir


def _eager(blocks: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_into(blocks, kind, torch.empty(blocks.shape[0], 32)).to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_blocks_dequantise_bitwise_as_the_eager_dequantiser(use, kind, dtype):
    fast = native.dequantizer(kind, dtype)
    assert fast is not None
    for n in (1, 2, 1023, 5000):  # single-threaded and parallel sizes, odd counts
        blocks = native.example_blocks(kind, n, seed=n)
        out = torch.full((n, 32), float("nan"), dtype=dtype)
        assert fast(blocks, out)
        ref = _eager(blocks, kind, dtype)
        assert _same_bits(out, ref) and ref.abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_float16_factor_dequantises_bitwise(use, kind, dtype):
    """All 65,536 float16 values as the scale d (and as the minimum m of Q4_1): subnormals, ±0, the largest,
    infinities and NaNs; the codes cover every nibble (or byte). NaN results must be NaN on both sides (the
    bit pattern of a NaN is the cast's business, and differs between CPU kernels)."""
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    blocks = native.example_blocks(kind, 65536, seed=7)
    blocks[:, 0:2] = halves.view(torch.uint8).view(-1, 2)
    if kind == "Q4_1":
        blocks[:, 2:4] = halves.flip(0).view(torch.uint8).view(-1, 2)
    out = torch.empty(65536, 32, dtype=dtype)
    assert native.dequantizer(kind, dtype)(blocks, out)
    ref = _eager(blocks, kind, dtype)
    nan = ref.isnan()
    assert torch.equal(out.isnan(), nan) and nan.any()
    assert _same_bits(out[~nan], ref[~nan])


def test_the_float16_decoder_is_torchs(use):
    lib = ctypes.CDLL(str(native.library_path()))
    decode = lib.qkv_half_to_float
    decode.restype, decode.argtypes = ctypes.c_float, [ctypes.c_uint16]
    want = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    got = torch.tensor([decode(i) for i in range(65536)], dtype=torch.float32)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # -0.0 and subnormals too


def test_inputs_it_was_not_built_for_are_refused_untouched(use):
    fast = native.dequantizer("Q4_1", torch.float32)
    blocks = native.example_blocks("Q4_1", 64)
    out = torch.zeros(64, 32)
    for b, o in ((blocks[::2], out[:32]), (blocks, torch.zeros(32, 64).t()), (blocks, out.double()),
                 (blocks[:, :18], out), (blocks, out[:63]), (blocks.view(torch.int8), out)):
        assert fast(b, o) is False
    assert not out.any()
    assert native.dequantizer("Q6_K", torch.float32) is None and native.dequantizer("Q4_1", torch.float16) is None
    assert fast(blocks[:0], out[:0]) is True  # nothing to do


def test_prompts_dequantise_natively_with_the_same_logits_bit_for_bit(use, tmp_path, monkeypatch):
    """A compact model's exact weights (a long prompt's, an analysis's) go through the library — every part
    of every matrix — and give the eager dequantiser's logits bit for bit."""
    from qkv.nn.quant import exact_weights

    model = qkv.load(tiny_gguf(tmp_path / "q4.gguf", "Q4_0", seed=5)).model
    calls = []
    real = native.dequantizer

    def counting(kind, dtype):
        fast = real(kind, dtype)
        return None if fast is None else (lambda b, o: calls.append((kind, fast(b, o))) or calls[-1][1])
    monkeypatch.setattr("qkv.weights.compact.dequantizer", counting)
    ids = torch.tensor([[(7 * i) % 250 + 3 for i in range(100)]])
    with torch.inference_mode(), exact_weights(model):
        fast = model(ids)
        assert calls.count(("Q4_0", True)) >= 4 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
        assert all(done for _, done in calls)  # every part taken by the library, none handed back to eager
        monkeypatch.setenv("QKV_COMPILE", "0")
        assert native.dequantizer("Q4_0", torch.float32) is None
        torch.testing.assert_close(model(ids), fast, rtol=0, atol=0)


def test_a_damaged_library_is_deleted_unloaded_and_a_wrong_one_not_used(use, tmp_path, monkeypatch, capsys):
    good = native.library_path()
    for name, data, says in ((good.name, good.read_bytes()[:2000], "is damaged"),  # truncated: never dlopened
                             (None, b"not a shared library" * 50, "does not load")):  # whole, but no library
        folder = tmp_path / says.replace(" ", "-") / "native"
        folder.mkdir(parents=True)
        target = folder / (name or native._file_name(native._stem(), data))
        target.write_bytes(data)
        monkeypatch.setenv("QKV_CACHE_DIR", str(folder.parent))
        assert native.dequantizer("Q4_1", torch.float32) is None
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and not target.exists()
        assert native.dequantizer("Q4_1", torch.bfloat16) is None and capsys.readouterr().err == ""  # said once

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))
    folder = tmp_path / "read-only" / "native"  # a damaged file that cannot be deleted: not used, no crash
    folder.mkdir(parents=True)
    (folder / good.name).write_bytes(good.read_bytes()[:2000])
    monkeypatch.setenv("QKV_CACHE_DIR", str(folder.parent))
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", refuse)
        assert native.dequantizer("Q4_1", torch.float32) is None
    err = capsys.readouterr().err
    assert "is damaged" in err and "not deleted (Permission denied)" in err and err.count("\n") == 1

    # a library that computes something else (q * d - m) loads but fails the bitwise check: not used
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "wrong"))
    wrong = tmp_path / "dequant.cpp"
    source = native.SOURCE.read_text()
    assert source.count("_mm256_add_ps(_mm256_mul_ps(q, d), m)") == 1 and source.count("c * d + m") == 1
    wrong.write_text(source.replace("_mm256_add_ps(_mm256_mul_ps(q, d), m)", "_mm256_sub_ps(_mm256_mul_ps(q, d), m)")
                     .replace("c * d + m", "c * d - m"))
    monkeypatch.setattr(native, "SOURCE", wrong)
    assert native.build() is not None and native.library_path() is not None
    assert native.dequantizer("Q4_1", torch.float32) is None
    err = capsys.readouterr().err
    assert "is not used" in err and "Q4_1 -> float32" in err and err.count("\n") == 1
    assert native.dequantizer("Q4_0", torch.float32) is not None  # the kinds it gets right stay in use


def test_build_failures_are_one_line_and_leave_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "native"
    for cxx, says in ((str(tmp_path / "no-such-compiler"), "could not run the C\\+\\+ compiler"),
                      ("false", "could not compile dequant.cpp")):
        monkeypatch.setenv("CXX", cxx)
        with pytest.raises(ConfigError, match=says) as e:
            native.build()
        assert "\n" not in str(e.value) and "fix:" in str(e.value)
        assert not any(folder.iterdir())  # no library, no temporary left behind
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler"):
        native.build()


def test_qkv_compile_1_builds_a_missing_library_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_COMPILE", "auto")
    assert native.dequantizer("Q8_0", torch.bfloat16) is None and native.library_path() is None  # auto: never
    monkeypatch.setenv("QKV_COMPILE", "1")
    fast = native.dequantizer("Q8_0", torch.bfloat16)
    assert fast is not None and native.library_path() is not None
    blocks = native.example_blocks("Q8_0", 10)
    out = torch.empty(10, 32, dtype=torch.bfloat16)
    assert fast(blocks, out) and _same_bits(out, _eager(blocks, "Q8_0", torch.bfloat16))
    assert native.status(["Q8_0", "F32"], [torch.bfloat16]) == {"Q8_0->bfloat16": True}


def test_the_library_covers_every_kind_the_eager_dequantiser_has():
    assert set(native.KINDS) == set(TORCH_DEQUANT)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="-march=x86-64 (the baseline without AVX2) is an x86 compiler flag")
def test_the_portable_loop_without_avx2_is_bitwise_too(tmp_path, monkeypatch):
    """The same source built for a baseline x86-64 CPU (no AVX2: the scalar loop the compiler vectorises as it
    can) — the path a CPU without AVX2 would run — against the eager dequantiser, every kind and dtype."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_COMPILE", "auto")
    monkeypatch.setattr(native, "FLAGS", tuple("-march=x86-64" if f == "-march=native" else f for f in native.FLAGS))
    assert native.build() is not None
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(-1, 2)
    for kind in KINDS:
        blocks = native.example_blocks(kind, 65536, seed=11)
        blocks[:, 0:2] = halves  # every float16 scale
        for dtype in DTYPES:
            out = torch.empty(65536, 32, dtype=dtype)
            assert native.dequantizer(kind, dtype)(blocks, out)
            ref = _eager(blocks, kind, dtype)
            nan = ref.isnan()
            assert torch.equal(out.isnan(), nan) and _same_bits(out[~nan], ref[~nan])


def test_a_failing_compiler_under_qkv_compile_1_is_one_line_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_COMPILE", "1")
    monkeypatch.setenv("CXX", "false")
    assert native.dequantizer("Q4_1", torch.float32) is None
    err = capsys.readouterr().err
    assert err.startswith("qkv: false could not compile dequant.cpp") and err.count("\n") == 1
    assert native.dequantizer("Q4_1", torch.float32) is None and capsys.readouterr().err == ""  # remembered


def test_a_missing_source_means_eager_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_COMPILE", "1")
    monkeypatch.setattr(native, "SOURCE", tmp_path / "dequant.cpp")  # a broken install without the package data
    assert native.dequantizer("Q4_1", torch.float32) is None and native.library_path() is None
    with pytest.raises(ConfigError, match="missing from this installation"):
        native.build()


def test_qkv_compile_dequantizer_only_builds_the_library_and_no_model(tmp_path, monkeypatch, capsys):
    from qkv.cli.main import main

    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QKV_COMPILE", "auto")
    assert main(["compile", "--dequantizer-only", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dequantizer"]["built"] and Path(d["dequantizer"]["path"]) == native.library_path()
    assert {k.split("->")[0] for k in d["dequantizers"]} == set(native.KINDS) and all(d["dequantizers"].values())
    assert not (tmp_path / "decode").exists() and not (tmp_path / "compact").exists()  # no model was touched
    assert main(["compile", "--dequantizer-only"]) == 0
    out = capsys.readouterr().out
    assert "(cached)" in out and "Q4_1->float32 in use" in out
    for argv in (["other.gguf"], ["--model", "other.gguf"]):
        assert main(["compile", "--dequantizer-only", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qkv: error:") and "--dequantizer-only" in err and err.count("\n") == 1
    # a library that builds but fails its bitwise check: reported, and the command says so with exit code 1
    wrong = tmp_path / "dequant.cpp"
    wrong.write_text(native.SOURCE.read_text().replace("(c - 8.0f) * d", "(c - 7.0f) * d")
                     .replace("_mm256_sub_ps(q, eight)", "_mm256_sub_ps(q, _mm256_set1_ps(7.0f))"))
    monkeypatch.setattr(native, "SOURCE", wrong)
    assert main(["compile", "--dequantizer-only"]) == 1
    out = capsys.readouterr().out
    assert "Q4_0->float32 NOT used" in out and "Q4_1->float32 in use" in out

