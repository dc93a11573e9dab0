"""The compiled decode step (qkv compile, qkv.models.compiled) on a tiny Q4_0 GGUF model: built once into the
cache, checked, used by generation with the eager step's tokens and logits, one package for every cache
length, a damaged package deleted and never used, bad settings refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qkv
from qkv.cli.main import main
from qkv.generate import SamplingOptions, generate_ids
from qkv.models import compiled

from .conftest import tiny_gguf


@pytest.fixture(scope="module")
def q4(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("compiled") / "q4.gguf", "Q4_0", seed=5)


@pytest.fixture(scope="module")
def built(q4, tmp_path_factory):
    """A cache dir holding the tiny model's package (built once for the module, ~15 s on 2 cores)."""
    cache = tmp_path_factory.mktemp("compiled-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKV_CACHE_DIR", str(cache))
        mp.setenv("QKV_COMPILE", "auto")
        mp.setenv("QKV_MATVEC", "torch")  # torch's kernels here (qkv's own: tests/weights/test_matvec.py)
        d = compiled.build(qkv.load(q4).model)
    assert d["built"] and d["self_check"] <= compiled.TOLERANCE and Path(d["path"]).parent == cache / "decode"
    return cache


@pytest.fixture
def use(built, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(built))
    monkeypatch.setenv("QKV_COMPILE", "auto")  # the suite's default is 0 (tests/conftest.py)
    monkeypatch.setenv("QKV_MATVEC", "torch")
    return built


class Counting:
    """A runner that counts the package's calls (a step that silently fell back to eager would not count)."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def run(self, inputs):
        self.calls += 1
        return self.runner.run(inputs)


def _run(model, ids: list[int], n: int, cache_len: int, forced: list[int] | None = None):
    """Greedy tokens (or the ``forced`` ones) and every step's logits through the model's forward (prefill,
    then one-token steps)."""
    cache = model.make_cache(1, cache_len)
    toks, logits = [], []
    with torch.inference_mode():
        lg = model(torch.tensor([ids]), cache=cache, last_only=True)[:, -1]
        for i in range(n):
            toks.append(int(lg.argmax(-1)) if forced is None else forced[i])
            lg = model(torch.tensor([[toks[-1]]]), cache=cache, last_only=True)[:, -1]
            logits.append(lg)
    return toks, torch.cat(logits), cache


@pytest.mark.parametrize("cache_len", [35, 200])
def test_generation_through_the_compiled_step_matches_the_eager_step(use, q4, cache_len):
    """One package serves every cache length (a dynamic dimension; 35 fills the cache to its last slot): every
    step runs through the package, its logits agree with the eager step's to bfloat16 rounding, and the caches
    hold the same keys and values."""
    model = qkv.load(q4).model
    step = compiled.step_for(model)
    assert step is not None and step.path.parent == use / "decode"
    step.runner = counting = Counting(step.runner)
    ids = [5, 17, 42, 8, 99]
    got, got_logits, got_cache = _run(model, ids, 30, cache_len)
    assert counting.calls == 30
    model.__dict__["_compiled_step"] = None  # the eager step, on the compiled run's tokens
    _, ref_logits, ref_cache = _run(model, ids, 30, cache_len, forced=got)
    err = float((got_logits - ref_logits).abs().max())
    print(f"compiled vs eager step, {cache_len}-position cache: logits max difference {err:.2e} "
          f"(largest logit {float(ref_logits.abs().max()):.1f})")
    # the logits come out of a bfloat16 kernel: a rounding that flips upstream moves them by an ulp or two
    # (2^-7 relative), never more
    assert 0 < float(ref_logits.abs().max()) and err <= 0.02 * float(ref_logits.abs().max())
    # greedy: where the eager step would pick another token, the two were a near-tie for the eager step too
    top2 = ref_logits.topk(2, dim=-1).values
    for i, (tok, best) in enumerate(zip(got, [int(ids[-1])] + ref_logits.argmax(-1).tolist())):
        if i and tok != best:
            assert float(top2[i - 1, 0] - top2[i - 1, 1]) <= 2 * err, (i, tok, best)
    first = next((i for i in range(30) if not torch.equal(got_logits[i], ref_logits[i])), 30)
    print(f"logits bitwise equal for the first {first} steps")
    assert first >= 3  # the same kernels on the same numbers until a rounding difference compounds
    for a, b in zip(got_cache, ref_cache):
        assert a.offset == b.offset == len(ids) + 30
        for x, y in ((a.k, b.k), (a.v, b.v)):
            assert torch.equal(x[:, :, :len(ids) + first], y[:, :, :len(ids) + first])
            assert float((x - y).abs().max()) <= 0.02 * float(y.abs().max())
    assert len(list((use / "decode").glob("*.pt2"))) == 1  # one package for both cache lengths


def test_the_step_is_not_used_where_it_does_not_apply(use, q4):
    """Two rows, an attention capture (an observer), caches the package was not built for, or a float32 model
    run their own paths: no package call, nothing advanced."""
    loaded = qkv.load(q4)
    model = loaded.model
    step = compiled.step_for(model)
    step.runner = counting = Counting(step.runner)
    ids = torch.tensor([[5, 17], [42, 8]])
    cache = model.make_cache(2, 8)
    with torch.inference_mode():
        model(ids, cache=cache, last_only=True)
        model(torch.tensor([[3], [4]]), cache=cache, last_only=True)
    pieces = [p for p, _ in qkv.capture_generation(loaded, "hello there", temperature=0, max_new_tokens=4)]
    assert counting.calls == 0 and len(pieces) >= 2
    x, pos, cos, ssin, ks, vs = compiled._example(model, 8)
    weights = model.decode_weights()
    for bad in ("lengths", "offsets", "dtype", "too long"):
        cache = model.make_cache(1, 8)
        if bad == "lengths":
            cache[1] = type(cache[1])(1, cache[1].k.shape[1], 9, cache[1].k.shape[3])
        elif bad == "offsets":
            cache[1].offset = 3
        elif bad == "dtype":
            cache = model.make_cache(1, 8)
            for c in cache:
                c.k, c.v = c.k.double(), c.v.double()
        else:
            cache = model.make_cache(1, model.config.max_position_embeddings + 1)
        offsets = [c.offset for c in cache]
        with torch.inference_mode():
            assert step(x, pos, cos, ssin, cache, weights) is None, bad
        assert [c.offset for c in cache] == offsets and counting.calls == 0
    assert step(x, pos, cos, ssin, model.make_cache(1, 8), weights[:-1] + [weights[-1][:1] + [
        ("int8", 0, (weights[-1][1][2][0][:, :-1], weights[-1][1][2][1]))]]) is None  # another weight shape
    exact = qkv.load(q4, dtype="float32").model
    assert exact.decode_weights(1) is None
    from tests.generate.test_loop import full_forward_greedy

    got = list(generate_ids(exact, [5, 17], SamplingOptions(temperature=0), max_new_tokens=3))
    assert got == full_forward_greedy(exact, [5, 17], 3)  # the eager path, token for token


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_package_is_deleted_and_never_used(built, q4, tmp_path, monkeypatch, capsys, damage):
    cache = tmp_path / "cache"
    (cache / "decode").mkdir(parents=True)
    [good] = (built / "decode").glob("*.pt2")
    data = good.read_bytes()
    bad = cache / "decode" / good.name
    bad.write_bytes({"garbage": b"not a package" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    monkeypatch.setenv("QKV_CACHE_DIR", str(cache))
    monkeypatch.setenv("QKV_COMPILE", "auto")
    monkeypatch.setenv("QKV_MATVEC", "torch")  # the kernels the package was built for
    model = qkv.load(q4).model
    assert compiled.step_for(model) is None
    err = capsys.readouterr().err
    assert "does not load" in err and "eager" in err and err.count("\n") == 1
    assert not bad.exists()
    model.__dict__.pop("_compiled_step")
    toks = list(generate_ids(model, [5, 17], SamplingOptions(temperature=0), max_new_tokens=5))
    monkeypatch.setenv("QKV_COMPILE", "0")
    model.__dict__.pop("_compiled_step")
    assert toks == list(generate_ids(model, [5, 17], SamplingOptions(temperature=0), max_new_tokens=5))


def test_a_package_that_computes_something_else_fails_its_check(use, q4, capsys, monkeypatch):
    """The check runs the package and the eager step on one synthetic cache: logits that differ, or a cache
    write that did not happen, fail it — and such a package is not used for this model, but not deleted (it
    may serve another model of the same shapes, whose own check passes)."""
    model = qkv.load(q4).model
    step = compiled.step_for(model)
    assert compiled.self_check(model, step) <= compiled.TOLERANCE

    class Shifted:
        def run(self, inputs):
            return [out + 1.0 for out in step.runner.run(inputs)]

    class Forgetful:  # computes the logits on copies of the caches: nothing written back
        def run(self, inputs):
            n = model.config.num_hidden_layers
            return step.runner.run(inputs[:4] + [t.clone() for t in inputs[4:4 + 2 * n]] + inputs[4 + 2 * n:])
    for runner in (Shifted(), Forgetful()):
        wrong = compiled.CompiledStep(runner, step.spec, compiled.flatten(model.decode_weights())[1], model, step.path)
        assert compiled.self_check(model, wrong) > compiled.TOLERANCE
    monkeypatch.setattr(compiled, "self_check", lambda m, s: 0.5)
    assert compiled.load(model)[0] is None and step.path.exists()
    err = capsys.readouterr().err
    assert "not used" in err and err.count("\n") == 1


def test_a_package_that_fails_mid_generation_hands_over_to_the_eager_step(use, q4, capsys):
    model = qkv.load(q4).model
    step = compiled.step_for(model)
    ref = list(generate_ids(model, [5, 17], SamplingOptions(temperature=0), max_new_tokens=6))

    class Failing:
        calls = 0

        def run(self, inputs):
            Failing.calls += 1
            if Failing.calls > 2:
                raise RuntimeError("an error\nfrom C++ with a backtrace\n  at frame 1")
            return step.runner.run(inputs)
    step.runner = Failing()
    got = list(generate_ids(model, [5, 17], SamplingOptions(temperature=0), max_new_tokens=6))
    err = capsys.readouterr().err
    assert got == ref and Failing.calls == 3 and step.broken and compiled.step_for(model) is None
    assert "failed" in err and "eager" in err and err.count("\n") == 1


def test_auto_never_builds_and_zero_never_loads(q4, use, tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    model = qkv.load(q4).model
    list(generate_ids(model, [5, 17], SamplingOptions(temperature=0), max_new_tokens=3))
    assert model.__dict__["_compiled_step"] is None and not (tmp_path / "decode").exists()
    monkeypatch.setenv("QKV_CACHE_DIR", str(use))
    monkeypatch.setenv("QKV_COMPILE", "0")
    model = qkv.load(q4).model
    list(generate_ids(model, [5, 17], SamplingOptions(temperature=0), max_new_tokens=3))
    assert model.__dict__["_compiled_step"] is None


def test_compile_cli_reports_and_refuses_what_it_cannot_compile(use, q4, capsys, monkeypatch, request):
    from qkv.weights import matvec

    # the crossover it measures: gone after this test, passed or not (the module's other tests use the defaults)
    request.addfinalizer(lambda: shutil.rmtree(use / "crossover", ignore_errors=True))

    monkeypatch.setattr(matvec, "build", lambda force=False: None)  # not built here (~12 s a --force; its own tests)
    assert main(["compile", "--model", str(q4), "--format", "json", "--steps", "4"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["built"] is False and Path(d["path"]).exists() and d["self_check"] <= compiled.TOLERANCE
    native = d["dequantizer"]  # the native dequantiser is built alongside (qkv.weights.native, its own tests)
    assert Path(native["path"]).parent == use / "native" and (native["compile_seconds"] or 0) >= 0
    assert d["dequantizers"]["Q4_0->float32"] is True and all(d["dequantizers"].values())
    c = d["crossover"]  # this machine's prompt rows on the compact matrices, measured and cached for later loads
    assert c["measured"] and 1 <= c["rows"] <= 96 and Path(c["path"]).parent == use / "crossover"
    assert [int(n) for n in c["ms"]] == [8, 16, 24, 32, 40, 48, 64, 96] and c["error"] is None
    assert "measured here by qkv compile" in qkv.load(q4).info["compact_rows"]
    assert main(["compile", "--model", str(q4), "--steps", "0"]) == 0  # the text report: both cached, in use
    out = capsys.readouterr().out
    assert "compiled decode step:" in out and "(cached)" in out and "Q4_0->float32 in use" in out
    assert f"prompts on the compact matrices: up to {c['rows']} tokens (measured before; {c['path']})" in out
    assert f"native dequantiser: {native['path']} (cached)" in out
    assert set(d["step_ms"]) == {"compiled", "eager"} and all(v > 0 for v in d["step_ms"].values())
    assert main(["compile", "--model", str(q4), "--steps", "-1"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["compile", "--model", str(q4), "--dtype", "float32", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error:") and "compact" in err and err.count("\n") == 1

    def no_compiler(*a, **k):
        raise RuntimeError("CppCompileError: C++ compile error\n\nCommand:\ng++ ... \nOutput: g++: not found")
    monkeypatch.setattr(compiled, "compile_package", no_compiler)
    assert main(["compile", "--model", str(q4), "--force", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error: could not compile") and "g++" in err and err.count("\n") == 1

    monkeypatch.setattr(compiled, "compile_package", lambda model, path: 0.0)  # the step "built" at once
    monkeypatch.setenv("CXX", "false")  # and then the native dequantiser's compiler fails
    assert main(["compile", "--model", str(q4), "--force", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error: false could not compile dequant.cpp") and err.count("\n") == 1
    monkeypatch.delenv("CXX")

    def unwritable(*a, **k):
        raise PermissionError(13, "Permission denied", "/ro/decode")
    monkeypatch.setattr(compiled, "compile_package", unwritable)
    assert main(["compile", "--model", str(q4), "--force", "--steps", "0"]) == 2
    err = capsys.readouterr().err  # the folder named, not the compiler blamed
    assert "could not write" in err and "/ro/decode" in err and "g++" not in err and err.count("\n") == 1
    for argv in (["--steps", "100000"], ["other.gguf"]):  # more steps than the context; two models named
        assert main(["compile", "--model", str(q4), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qkv: error:") and err.count("\n") == 1
    monkeypatch.setenv("QKV_COMPILE", "yes")
    assert main(["generate", "--model", str(q4), "hello", "-n", "3", "-t", "0"]) == 2
    err = capsys.readouterr().err
    assert "QKV_COMPILE='yes'" in err and err.count("\n") == 1
    assert main(["compile", "--model", str(q4), "--steps", "0"]) == 2  # refused before anything is compiled
    assert "QKV_COMPILE='yes'" in capsys.readouterr().err
