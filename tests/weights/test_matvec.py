"""The native matrix-vector operators (qkv.weights.matvec, matvec.cpp; torch.ops.qkv.q4_mv and q8_mv): built with
the machine's C++ compiler against the installed torch into a temporary cache, the references' numbers (the same
int8-activation arithmetic in float64 sums) for both block kinds and int8 rows, every shape a model has and odd
ones, on one and several threads; a row of x the same bits alone as in a batch (the 4-bit operator's tiles); the
portable loops built without AVX2; the error against the exact float64 product within the rounding's bound;
non-finite inputs give NaN, never a finite guess; bad operands refused in one message; a damaged or
disagreeing library never used; the choice of kernels (QKV_MATVEC); a model decoding through them close to
float32, on the module path and in the compiled decode step."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from qkv.errors import ConfigError
from qkv.weights import matvec
from qkv.weights.int4 import dequantize_into

from tests.decode_check import steps_against_float32

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def q4_cache(tmp_path_factory) -> Path:
    """A cache folder holding the operator's library (built once, ~12 s), loaded into this process."""
    cache = tmp_path_factory.mktemp("matvec-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKV_CACHE_DIR", str(cache))
        mp.setenv("QKV_COMPILE", "auto")
        assert matvec.build() is not None and matvec.build() is None  # cached the second time
        assert matvec.library_path().parent == cache / "native"
        assert matvec.available()
    return cache


@pytest.fixture
def use(q4_cache, monkeypatch) -> Path:
    monkeypatch.setenv("QKV_CACHE_DIR", str(q4_cache))
    monkeypatch.setenv("QKV_COMPILE", "auto")  # the suite's default is 0 (tests/conftest.py)
    monkeypatch.setenv("QKV_MATVEC", "native")  # whatever this CPU's ATen kernels are
    return q4_cache


def _exact(x: torch.Tensor, blocks: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product x W^T in float64, and the bound on what rounding x to int8 per block can change in it."""
    n, k = blocks.shape[0], x.shape[1]
    w = dequantize_into(blocks.view(-1, matvec.BLOCK_BYTES[matvec.KINDS[name]]), name, torch.empty(n * k // 32, 32))
    w = w.view(n, k).double()
    half_step = x.double().abs().view(x.shape[0], -1, 32).amax(-1) / 254  # (M, K/32)
    return x.double() @ w.t(), half_step @ w.abs().view(n, -1, 32).sum(-1).t()


@pytest.mark.parametrize("name", sorted(matvec.KINDS))
@pytest.mark.parametrize("n,k,m", [(64, 32, 1), (1, 576, 1), (37, 96, 3), (960, 576, 1), (576, 1536, 2), (3072, 576, 1),
                                   (49, 64, 17)])
def test_products_are_the_references_and_close_to_the_exact_ones(use, name, n, k, m):
    kind = matvec.KINDS[name]
    blocks = matvec.example(name, n, k, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    got = matvec.q4_mv(x, blocks, kind)
    assert got.shape == (m, n) and got.dtype == torch.float32
    ref, (exact, bound) = matvec.reference(x, blocks, kind), _exact(x, blocks, name)
    scale = float(exact.abs().max())
    assert float((got.double() - ref).abs().max()) <= 2e-6 * scale
    # int8 activations: an approximation, and a bounded one. Rounding moves each x_j by at most half a step,
    # max|x| / 254 of its block, so |y - exact| <= sum over blocks of that times sum |w_j| (plus float32 sums).
    diff = (got.double() - exact).abs()
    assert bool((diff <= bound * (1 + 1e-4) + 1e-5 * scale).all()) and float(diff.max()) > 0
    print(f"{name} {n}x{k}, {m} rows: largest error {float(diff.max()) / scale:.2e} of the largest exact output, "
          f"{float((diff / bound).max()):.2f} of the rounding's bound")
    threads = torch.get_num_threads()
    try:  # one thread: the same numbers (rows are split among threads, each row summed in order)
        torch.set_num_threads(1)
        assert torch.equal(matvec.q4_mv(x, blocks, kind), got)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(matvec.KINDS))
def test_a_row_gets_the_same_bits_alone_as_in_a_batch(use, name):
    """q4_mv unpacks a row of W once for every 4 rows of x, then 3, 2 or 1 for the rest: each of those tiles must
    do each row's arithmetic in the same order, so that a prompt's rows equal the decode steps' one-row products."""
    kind = matvec.KINDS[name]
    blocks = matvec.example(name, 45, 576, seed=11)
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(7)) * 2
    whole = matvec.q4_mv(x, blocks, kind)
    for i in range(11):
        assert torch.equal(matvec.q4_mv(x[i:i + 1], blocks, kind), whole[i:i + 1]), f"row {i} alone"
    for m in range(1, 11):  # every tile split: 4s then a 3, 2 or 1
        assert torch.equal(matvec.q4_mv(x[:m], blocks, kind), whole[:m]), f"the first {m} rows"
        assert torch.equal(matvec.q4_mv(x[m:], blocks, kind), whole[m:]), f"rows {m}.."


@pytest.mark.parametrize("n,k,m", [(64, 32, 1), (1, 576, 1), (37, 96, 3), (49152, 576, 1), (300, 1536, 5)])
def test_int8_rows_are_the_references_and_within_the_roundings_bound(use, n, k, m):
    from qkv.nn.quant import CompactLinear

    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * 0.05
    w8, scales = CompactLinear.quantize_int8(w)
    x = torch.randn(m, k, generator=g)
    got = matvec.q8_mv(x, w8, scales)
    assert got.shape == (m, n) and got.dtype == torch.float32
    wq = w8.double() * scales.double()[:, None]  # the int8 rows' own values: what the model holds
    exact = x.double() @ wq.t()
    bound = (x.double().abs().view(m, -1, 32).amax(-1) / 254) @ wq.abs().view(n, -1, 32).sum(-1).t()
    scale = float(exact.abs().max())
    assert float((got.double() - matvec.reference8(x, w8, scales)).abs().max()) <= 2e-6 * scale
    diff = (got.double() - exact).abs()
    assert bool((diff <= bound * (1 + 1e-4) + 1e-5 * scale).all()) and float(diff.max()) > 0
    print(f"int8 {n}x{k}, {m} rows: largest error {float(diff.max()) / scale:.2e} of the largest exact output")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(matvec.q8_mv(x, w8, scales), got)
    finally:
        torch.set_num_threads(threads)


def test_tiny_and_huge_activations(use):
    """Blocks whose largest value is below ~1e-36 count as zero (their scale's inverse would overflow); huge
    values round to +-127 as any others."""
    blocks = matvec.example("Q4_1", 5, 64, seed=6)
    w8, scales = torch.randint(-127, 128, (5, 64), dtype=torch.int8), torch.rand(5).bfloat16()
    x = torch.randn(2, 64)
    x[0, :32] = 1e-38  # a denormal scale
    x[1, 32:] = 1e35 * torch.sign(torch.randn(32))
    for got, want in ((matvec.q4_mv(x, blocks, 1), matvec.reference(x, blocks, 1)),
                      (matvec.q8_mv(x, w8, scales), matvec.reference8(x, w8, scales))):
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_the_error_is_the_int8_rounding_of_the_activations(use):
    """Activations that int8 represents exactly (integers up to 127 in each block with its largest at 127) give
    the exact product up to float32 sums."""
    blocks = matvec.example("Q4_1", 64, 256, seed=2)
    x = torch.randint(-127, 128, (2, 256), generator=torch.Generator().manual_seed(2)).float()
    x.view(2, -1, 32)[:, :, 0] = 127
    exact, _ = _exact(x, blocks, "Q4_1")
    assert float((matvec.q4_mv(x, blocks, 1).double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


def test_zero_and_non_finite_activations(use):
    blocks = matvec.example("Q4_0", 8, 96, seed=4)
    w8, scales = torch.randint(-127, 128, (8, 96), dtype=torch.int8), torch.rand(8).bfloat16()
    products = (lambda x: matvec.q4_mv(x, blocks, 0), lambda x: matvec.q8_mv(x, w8, scales))
    for product in products:
        assert torch.equal(product(torch.zeros(2, 96)), torch.zeros(2, 8))
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(3, 96)
            x[1, 40] = bad  # one value of the second row's second block
            y = product(x)
            assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all(), bad


def test_bad_operands_are_one_message_not_a_crash(use):
    blocks = matvec.example("Q4_1", 4, 64)
    cases = [
        (torch.randn(1, 64).double(), blocks, 1, "float32"),
        (torch.randn(64), blocks, 1, "2-d"),
        (torch.randn(1, 96), blocks, 1, "K = 96"),
        (torch.randn(1, 64), blocks.float(), 1, "uint8"),
        (torch.randn(1, 64), blocks[:, ::2], 1, "contiguous"),
        (torch.randn(1, 64), blocks, 2, "kind"),
        (torch.randn(1, 64), blocks, 0, "K = 64"),  # 20-byte rows are not Q4_0's 18
        (torch.randn(2, 0), torch.zeros(4, 0, dtype=torch.uint8), 1, "K = 0, not a positive multiple of 32"),
    ]
    for x, b, kind, says in cases:
        with pytest.raises(RuntimeError, match=says):
            torch.ops.qkv.q4_mv(x, b, kind)
    w8, scales = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, dtype=torch.bfloat16)
    cases8 = [
        (torch.randn(1, 64), w8.to(torch.uint8), scales, "int8"),
        (torch.randn(1, 64), w8, scales.float(), "bfloat16"),
        (torch.randn(1, 64), w8, scales[:3], "one scale a row"),
        (torch.randn(1, 32), w8, scales, "K = 32"),
        (torch.randn(1, 48), torch.zeros(4, 48, dtype=torch.int8), scales, "multiple of 32"),
        (torch.randn(1, 0), torch.zeros(4, 0, dtype=torch.int8), scales, "K = 0"),
    ]
    for x, w, sc, says in cases8:
        with pytest.raises(RuntimeError, match=says):
            torch.ops.qkv.q8_mv(x, w, sc)
    # an operand on the meta device (what torch.export traces with): shapes only, never an uninitialised CPU result
    assert torch.ops.qkv.q4_mv(torch.randn(2, 64, device="meta"), blocks, 1).device.type == "meta"
    assert torch.ops.qkv.q8_mv(torch.randn(1, 64), w8, scales.to("meta")).device.type == "meta"
    with pytest.raises(RuntimeError, match="K = 96"):  # the meta kernels check what the CPU ones check
        torch.ops.qkv.q4_mv(torch.randn(1, 96, device="meta"), blocks, 1)
    strided = torch.randn(64, 3)[:, 0].reshape(1, 64)  # a strided x is taken
    assert torch.equal(torch.ops.qkv.q4_mv(strided, blocks, 1), torch.ops.qkv.q4_mv(strided.contiguous(), blocks, 1))
    assert matvec.q4_mv(torch.randn(0, 64), blocks, 1).shape == (0, 4)


def test_a_library_that_disagrees_is_not_used(use, monkeypatch, capsys):
    monkeypatch.setattr(matvec, "reference8", lambda x, w8, scales: torch.ones(x.shape[0], w8.shape[0]).double())
    monkeypatch.setattr(matvec, "_STATE", {})
    monkeypatch.setattr(matvec, "_LOADED", {})  # checked anew (loading the same file again registers nothing)
    assert not matvec.available() and matvec.kernels() == frozenset()
    err = capsys.readouterr().err
    assert "are not used (their int8 products differ from the reference)" in err
    assert "QKV_MATVEC=native, but the native matrix-vector operators are not available" in err


def test_a_damaged_library_is_deleted_unloaded(use, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "native"
    folder.mkdir()
    good = matvec.library_path()
    bad = folder / good.name  # the right name, other contents: never loaded (loading it could crash the process)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    assert matvec.library_path() is None and not bad.exists()
    assert "native matrix-vector operators" in capsys.readouterr().err


_PORTABLE = """
import torch
from qkv.weights import matvec
matvec.FLAGS = tuple("-march=x86-64" if f == "-march=native" else f for f in matvec.FLAGS)
assert matvec.build() is not None and matvec.available()  # available(): checked against the reference
g = torch.Generator().manual_seed(3)
for name, kind in matvec.KINDS.items():
    blocks = matvec.example(name, 45, 576, seed=kind)
    x = torch.randn(11, 576, generator=g) * 2
    got = matvec.q4_mv(x, blocks, kind)
    ref = matvec.reference(x, blocks, kind)
    assert float((got.double() - ref).abs().max()) <= 2e-6 * float(ref.abs().max()), name
    for i in range(11):
        assert torch.equal(matvec.q4_mv(x[i:i + 1], blocks, kind), got[i:i + 1]), (name, i)
        assert torch.equal(matvec.q4_mv(x[:i + 1], blocks, kind), got[:i + 1]), (name, "first", i + 1)
w8, scales = torch.randint(-127, 128, (37, 576), dtype=torch.int8, generator=g), torch.rand(37).bfloat16()
x = torch.randn(5, 576, generator=g)
ref = matvec.reference8(x, w8, scales)
assert float((matvec.q8_mv(x, w8, scales).double() - ref).abs().max()) <= 2e-6 * float(ref.abs().max())
print("ok")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="-march=x86-64 (the baseline without AVX2) is an x86 compiler flag")
def test_the_portable_loop_without_avx2(tmp_path):
    """The same source built for a baseline x86-64 CPU (no AVX2: the scalar loops) — the path a CPU without AVX2
    would run under QKV_MATVEC=native — against the reference, tiles included. In a process of its own: a process
    registers the operators' namespace once."""
    env = dict(os.environ, QKV_CACHE_DIR=str(tmp_path), QKV_COMPILE="auto", QKV_MATVEC="native")
    r = subprocess.run([sys.executable, "-c", _PORTABLE], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_a_library_that_does_not_load_is_deleted(q4_cache, tmp_path):
    """A file named as the library (its digest right) that is no shared library: deleted, said in one line,
    torch's kernels used (a fresh process: this one has registered the operators already)."""
    (tmp_path / "native").mkdir()
    name = _library_in(q4_cache).name.rsplit("-", 1)[0]
    data = b"not a shared library" * 50
    bad = tmp_path / "native" / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.so"
    bad.write_bytes(data)
    env = {**os.environ, "QKV_CACHE_DIR": str(tmp_path), "QKV_COMPILE": "auto", "QKV_MATVEC": "native"}
    code = "from qkv.weights import matvec; print(*sorted(matvec.kernels()) or ['none'])"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["none"] and not bad.exists()
    lines = done.stderr.strip().splitlines()
    assert "do not load" in lines[0] and "deleted" in lines[0] and len(lines) == 2  # then: QKV_MATVEC=native, but


def test_info_hardware_reports_them(use, capsys):
    from qkv.cli.main import main

    assert main(["info", "--hardware", "--format", "json", "--matmul-seconds", "0.02"]) == 0
    mv = json.loads(capsys.readouterr().out)["low_bit"]["qkv_matvec"]
    assert mv["exists"] and mv["works"] and mv["decodes"] == ["q4", "q8"] and not mv["off"]
    assert main(["info", "--hardware", "--matmul-seconds", "0.02"]) == 0
    assert "qkv.q4_mv, qkv.q8_mv: works; one-token steps use them for 4-bit matrices, int8 unembedding" in \
        capsys.readouterr().out


def test_kernel_choice(use, monkeypatch, capsys):
    assert matvec.kernels() == {"q4", "q8"}
    monkeypatch.setenv("QKV_MATVEC", "torch")
    assert matvec.kernels() == frozenset()
    monkeypatch.setenv("QKV_MATVEC", "auto")  # q8 on AVX2 and AVX-512 kernels; q4 on AVX2 kernels only
    want = {"AVX2": {"q4", "q8"}, "AVX512": {"q8"}}.get(torch.backends.cpu.get_cpu_capability(), set())
    assert matvec.kernels() == want
    monkeypatch.setenv("QKV_COMPILE", "0")  # never loads compiled code: torch's kernels
    monkeypatch.setenv("QKV_MATVEC", "native")
    monkeypatch.setattr(matvec, "_STATE", {})
    assert matvec.kernels() == frozenset()
    assert "QKV_MATVEC=native, but" in capsys.readouterr().err
    monkeypatch.setenv("QKV_MATVEC", "fast")
    with pytest.raises(ConfigError, match="QKV_MATVEC='fast' is not auto, native or torch"):
        matvec.kernels()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ATEN_CPU_CAPABILITY=avx2 is x86's")
def test_auto_decodes_with_them_on_avx2_kernels(q4_cache):
    """A process whose ATen kernels are AVX2 (ATEN_CPU_CAPABILITY=avx2 stands in for an AVX2-only CPU) chooses
    both by itself where the library is cached, and torch's kernels with QKV_COMPILE=0."""
    env = {**os.environ, "QKV_CACHE_DIR": str(q4_cache), "ATEN_CPU_CAPABILITY": "avx2"}
    env.pop("QKV_MATVEC", None)
    code = "from qkv.weights import matvec; print(*sorted(matvec.kernels()))"
    for compile_mode, want in (("auto", ["q4", "q8"]), ("0", [])):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "QKV_COMPILE": compile_mode}, cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
        assert out == want, compile_mode


@pytest.fixture(scope="module")
def native_model(q4_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKV_CACHE_DIR", str(q4_cache))
        mp.setenv("QKV_COMPILE", "auto")
        mp.setenv("QKV_MATVEC", "native")
        return qkv.load("smollm2")


def test_smollm2_decodes_through_it_close_to_float32(native_model, smollm2):
    """The file's blocks are the weights (nothing re-rounded): one-token steps' KL against the float32 model
    small, greedy tokens equal where float32 is not near a tie, and the exact analyses' weights unchanged."""
    from qkv.nn.quant import exact_weights
    from qkv.generate import SamplingOptions, generate_ids
    from qkv.nn.quant import CompactLinear

    m = native_model.model
    layer = m.model.layers[3]
    for mod in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(mod, CompactLinear) and mod.kind == "q4" and mod.blocks.dtype == torch.uint8
    assert m.lm_head.kind == "q8" and "native operator" in native_model.info["decode_weights"]
    ids = smollm2.tokenizer.encode("The history of science shows that")
    with torch.inference_mode(), exact_weights(m):  # what explain and qkv.capture see: the float32 model's logits
        torch.testing.assert_close(m(torch.tensor([ids * 3])), smollm2.model(torch.tensor([ids * 3])), rtol=0, atol=0)
    kls, agree, clear, ref_tokens = steps_against_float32(smollm2, native_model, ids, 32)
    print(f"native operators: mean KL {sum(kls) / len(kls):.2e}, max {max(kls):.2e}; greedy {agree}/{clear}")
    assert sum(kls) / len(kls) < 2e-2 and agree == clear
    got = list(generate_ids(m, ids, SamplingOptions(temperature=0), max_new_tokens=32))
    equal = next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), 32)
    print(f"greedy tokens equal to float32's for {equal} of 32")


def test_the_compiled_step_calls_it(q4_cache, tmp_path, monkeypatch):
    """AOTInductor compiles the operator into the decode step (a call through torch's dispatcher): a tiny Q4_1
    model's package passes its check against the eager step and generates the eager step's tokens."""
    from qkv.models import compiled

    from tests.models.conftest import tiny_gguf

    path = tiny_gguf(tmp_path / "q41.gguf", "Q4_1", seed=9)
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "native").mkdir(parents=True)
    shutil.copy(_library_in(q4_cache), tmp_path / "cache" / "native")  # not built again (~12 s)
    monkeypatch.setenv("QKV_COMPILE", "auto")
    monkeypatch.setenv("QKV_MATVEC", "native")
    model = qkv.load(path).model
    kinds = {mod.kind for mod in model.modules() if hasattr(mod, "kind")}
    assert "q4" in kinds and "q8" in kinds and not kinds & {"int4", "int8"}
    d = compiled.build(model)
    assert d["built"] and d["self_check"] <= compiled.TOLERANCE
    step = compiled.step_for(model)
    assert step is not None
    calls = []
    runner = step.runner

    class Counting:  # a step that silently fell back to eager would not count
        def run(self, inputs):
            calls.append(1)
            return runner.run(inputs)
    step.runner = Counting()
    ids = [3, 5, 7]

    def greedy(m, n=12):
        cache = m.make_cache(1, 32)
        out = []
        with torch.inference_mode():
            lg = m(torch.tensor([ids]), cache=cache, last_only=True)[:, -1]
            for _ in range(n):
                out.append(int(lg.argmax(-1)))
                lg = m(torch.tensor([[out[-1]]]), cache=cache, last_only=True)[:, -1]
        return out
    compiled_tokens = greedy(model)
    assert len(calls) == 12  # every one-token step through the package, which calls the operators
    model.__dict__["_compiled_step"] = None  # the eager step
    assert greedy(model) == compiled_tokens


def _library_in(cache: Path) -> Path:
    (found,) = (cache / "native").glob("matvec-*.so")
    return found


def test_qkv_compile_native_only_builds_both_libraries(use, monkeypatch, capsys, tmp_path):
    from qkv.cli.main import main

    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    (tmp_path / "native").mkdir()
    shutil.copy(_library_in(use), tmp_path / "native")  # not built again here (~12 s)
    assert main(["compile", "--native-only", "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dequantizer"]["built"] and not d["matvec"]["built"] and d["matvec"]["passes_check"]
    assert d["matvec"]["decodes"] == ["q4", "q8"]
    assert main(["compile", "--native-only"]) == 0
    out = capsys.readouterr().out
    assert "native matrix-vector operators:" in out and "(cached; checked)" in out
    assert "for the 4-bit matrices and the int8 unembedding here" in out
    assert not (tmp_path / "decode").exists() and not (tmp_path / "compact").exists()  # no model was touched
