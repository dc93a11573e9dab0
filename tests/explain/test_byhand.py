"""`qkv byhand`: the numbers (independent checks), the module equality, goldens, and every bad input."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.cli.main import main
from qkv.errors import InputError
from qkv.explain import byhand
from qkv.nn import SelfAttention

GOLDEN = Path(__file__).parent / "golden"


def run_cli(capsys, *argv):
    code = main(["byhand", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_exact_numbers_equal_selfattention_module():
    """The by-hand trace equals qkv.nn.SelfAttention run with the same weights (float64)."""
    trace = byhand.compute(byhand.default_example(2))
    x = torch.tensor(trace.example.X)
    for h in trace.heads:
        m = SelfAttention(6, h.d_k).double()
        with torch.no_grad():
            m.q_proj.weight.copy_(torch.tensor(h.W["WQ"]))
            m.k_proj.weight.copy_(torch.tensor(h.W["WK"]))
            m.v_proj.weight.copy_(torch.tensor(h.W["WV"]))
        with torch.no_grad():
            z, w = m(x, return_weights=True)
        np.testing.assert_allclose(h.exact.Z, z.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h.exact.weights, w.numpy(), rtol=1e-12, atol=1e-12)


def independent_numpy(x, wq, wk, wv):
    """The exercise in column layout, written separately: A = column softmax of KᵀQ / √d_k, Z = V A."""
    xc = np.asarray(x, dtype=float).T  # features x tokens
    q, k, v = np.asarray(wq) @ xc, np.asarray(wk) @ xc, np.asarray(wv) @ xc
    s = k.T @ q / math.sqrt(q.shape[0])
    a = np.exp(s) / np.exp(s).sum(axis=0, keepdims=True)
    return a, v @ a


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_exact_trace_equals_independent_numpy(seed):
    ex = byhand.random_example(seed, n_heads=2)
    trace = byhand.compute(ex)
    for h in trace.heads:
        a, z = independent_numpy(ex.X, h.W["WQ"], h.W["WK"], h.W["WV"])
        np.testing.assert_allclose(h.exact.weights, a.T, rtol=1e-12)
        np.testing.assert_allclose(h.exact.Z, z.T, rtol=1e-12)
        np.testing.assert_allclose(h.exact.weights.sum(1), 1.0, rtol=1e-12)


def test_approximation_in_exact_fractions():
    """⌊x/2⌋ and 3^x in integer/Fraction arithmetic: the classroom numbers, independently of numpy."""
    ex = byhand.default_example(1)
    h = byhand.compute(ex).heads[0]
    x = [[int(v) for v in row] for row in ex.X]
    w = {n: [[int(v) for v in row] for row in m] for n, m in h.W.items()}
    proj = lambda m: [[sum(a * b for a, b in zip(row, tok)) for row in m] for tok in x]  # noqa: E731
    q, k, v = proj(w["WQ"]), proj(w["WK"]), proj(w["WV"])
    for i in range(4):
        ex3 = [Fraction(3) ** (sum(a * b for a, b in zip(q[i], k[j])) // 2) for j in range(4)]
        a = [e / sum(ex3) for e in ex3]
        assert sum(a) == 1
        np.testing.assert_allclose(h.approx.weights[i], [float(f) for f in a], rtol=1e-15)
        z = [sum(a[j] * v[j][c] for j in range(4)) for c in range(3)]
        np.testing.assert_allclose(h.approx.Z[i], [float(f) for f in z], rtol=1e-15)


def test_two_heads_give_six_to_six():
    trace = byhand.compute(byhand.default_example(2))
    assert trace.output().shape == (4, 6)
    np.testing.assert_array_equal(trace.output()[:, 3:], trace.heads[1].exact.Z)


@pytest.mark.parametrize("fmt,ext", [("text", "txt"), ("json", "json"), ("markdown", "md")])
def test_golden_default_outputs(capsys, fmt, ext, tmp_path):
    """Golden files of the default 2-head example (regenerate with QKV_REGEN_GOLDEN=1 after a reviewed change)."""
    out_file = tmp_path / f"out.{ext}"
    code, _, err = run_cli(capsys, "--heads", "2", "--format", fmt, "--output", str(out_file))
    assert code == 0, err
    got = out_file.read_text(encoding="utf-8")
    golden = GOLDEN / f"byhand_default.{ext}"
    if __import__("os").environ.get("QKV_REGEN_GOLDEN"):
        golden.write_text(got, encoding="utf-8")
    want = golden.read_text(encoding="utf-8")
    if fmt == "json":  # full-precision floats: NumPy's exp differs by an ulp between AVX2 and AVX-512 kernels
        assert_json_close(json.loads(got), json.loads(want))
    else:  # rounded display values only: the same text on every CPU
        assert got == want


def assert_json_close(got, want, path: str = "$", rtol: float = 1e-12) -> None:
    """Same structure, keys and strings; numbers equal within ``rtol`` (a few float64 ulps of slack)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_json_close(got[key], want[key], f"{path}.{key}", rtol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length differs"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_json_close(g, w, f"{path}[{i}]", rtol)
    elif isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{path}: {got!r} is not a number"
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-15), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def test_json_golden_comparison_can_fail():
    """The tolerant comparison still catches a changed number, key or string."""
    want = {"a": [1.0, 0.25], "s": "x"}
    assert_json_close({"a": [1.0, 0.25 * (1 + 1e-15)], "s": "x"}, want)
    for bad in ({"a": [1.0, 0.2500001], "s": "x"}, {"a": [1.0], "s": "x"}, {"a": [1.0, 0.25], "s": "y"},
                {"b": [1.0, 0.25], "s": "x"}):
        with pytest.raises(AssertionError):
            assert_json_close(bad, want)


def test_json_output_shape_and_row_layout(capsys):
    code, out, _ = run_cli(capsys, "--format", "json")
    assert code == 0
    d = json.loads(out)
    assert set(d) >= {"heads", "output", "approx"}
    h = d["heads"][0]
    assert set(h) >= {"Q", "K", "V", "scores", "weights", "Z"}
    assert np.array(h["Q"]).shape == (4, 3)
    np.testing.assert_allclose(np.array(h["weights"]).sum(1), 1.0)
    assert "approx" not in json.loads(run_cli(capsys, "--format", "json", "--exact")[1])


def test_html_is_self_contained_and_escaped(capsys, tmp_path):
    f = tmp_path / "in.json"
    f.write_text(json.dumps({"X": [[1, 0], [0, 1]], "WQ": [[1, 0]], "WK": [[0, 1]], "WV": [[1, 1]],
                             "tokens": ["<script>alert(1)</script>", "a&b"]}))
    code, out, _ = run_cli(capsys, "--input", str(f), "--format", "html")
    assert code == 0
    assert "<script>alert" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "http://" not in out and "https://" not in out and "Content-Security-Policy" in out


def test_text_default_shows_both_and_user_file(capsys, tmp_path):
    code, out, _ = run_cli(capsys)
    assert code == 0 and "approx: 3^x" in out and "exact: e^x" in out and "⌊x / 2⌋" in out
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"X": DEFAULT_X(), "WQ": [[1] * 6], "WK": [[1] * 6], "WV": [[1] * 6]}))
    code, out, _ = run_cli(capsys, "--input", str(f), "--exact")
    assert code == 0 and "3^x" not in out


def DEFAULT_X():
    return byhand.DEFAULT_X


BAD = [
    ({"WQ": [[1]]}, "missing key 'X'"),
    ({"X": [[1, 2], [3]], "WQ": [[1, 2]], "WK": [[1, 2]], "WV": [[1, 2]]}, "X is ragged"),
    ({"X": [[1, "a"]], "WQ": [[1, 2]], "WK": [[1, 2]], "WV": [[1, 2]]}, "X\\[0\\]\\[1\\] = 'a' is not a finite number"),
    ({"X": [], "WQ": [[1]], "WK": [[1]], "WV": [[1]]}, "X must be a non-empty"),
    ({"X": [[1, 2]], "WQ": [[1, 2, 3]], "WK": [[1, 2]], "WV": [[1, 2]]}, "WQ is 1x3 but X has 2 features"),
    ({"X": [[1, 2]], "WQ": [[1, 2]], "WK": [[1, 2], [3, 4]], "WV": [[1, 2]]}, "same d_k"),
    ({"X": [[1, 2]], "WQ": [[1, 2]], "WV": [[1, 2]]}, "missing WK"),
    ({"X": [[1, 2]], "heads": []}, "'heads' must be a non-empty list"),
    ({"X": [[1, 2]], "heads": [{"WQ": [[1, 2]], "WK": [[1, 2]], "WV": [[1]]}]}, "WV is 1x1"),
    ([1, 2], "expected a JSON object"),
    ({"X": [[True, 1]], "WQ": [[1, 2]], "WK": [[1, 2]], "WV": [[1, 2]]}, "not a finite number"),
]


@pytest.mark.parametrize("obj,match", BAD)
def test_bad_input_files_exit_2_with_one_line(capsys, tmp_path, obj, match):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(obj))
    code, out, err = run_cli(capsys, "--input", str(f))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("qkv: error: ") and "Traceback" not in err
    assert __import__("re").search(match, err), err


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON at line 1"), (None, "no such file"),
                                           ('{"X": [[NaN]]}', "not a finite number")])
def test_unreadable_files(capsys, tmp_path, content, match):
    f = tmp_path / "x.json"
    if content is not None:
        f.write_text(content)
    code, _, err = run_cli(capsys, "--input", str(f))
    assert code == 2 and match in err


def test_bad_options(capsys):
    assert run_cli(capsys, "--heads", "3")[0] == 2
    assert run_cli(capsys, "--seed", "-1")[0] == 2
    with pytest.raises(InputError, match="overflow"):
        byhand.compute(byhand.parse_example({"X": [[1000.0]], "WQ": [[1000.0]], "WK": [[1000.0]], "WV": [[1]]}))


def test_python_dash_m_entry_point_and_exit_code(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "b.json"
    bad.write_text("[]")
    r = subprocess.run([sys.executable, "-m", "qkv", "byhand", "--input", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("qkv: error:")
    r = subprocess.run([sys.executable, "-m", "qkv", "byhand", "--format", "json", "--heads", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and len(json.loads(r.stdout)["output"][0]) == 6
