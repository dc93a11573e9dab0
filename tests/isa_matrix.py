"""Run the numerically sensitive tests under the other CPU kinds' kernels (``make test-isa``).

The project's machines are AVX2-only or AVX-512 with AVX512-BF16 and AMX. NumPy, oneDNN and PyTorch's
own ATen kernels pick their code paths from the CPU, and those paths round differently (NumPy's AVX-512
``exp`` is one ulp off its AVX2 one; oneDNN's native bf16 rounds unlike the AVX2 path that converts to
fp32). Each selection below runs the sensitive tests in a fresh process with the variables that make
this machine take another kind's kernels, so a developer on either kind sees the other kind's failures
before CI does. A machine can only step *down*: on an AVX2-only CPU the AVX-512 selections cannot be
exercised, and they are reported as not run (with the reason), never as passed.

Usage: python tests/isa_matrix.py [--only NAME ...] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the tests whose numbers depend on the kernels: NumPy float64 maths, oneDNN bf16/fp32 matmuls, SDPA,
# the int4 kernel, dequantisation, and the faithfulness measures built on all of them
SENSITIVE = [
    "tests/explain/test_byhand.py",
    "tests/explain/test_measures.py",
    "tests/nn",
    "tests/weights/test_quants.py",
    "tests/models/test_llama_parity.py",
    "tests/models/test_llama_tiny.py",
    "tests/models/test_bert.py",
    "tests/generate/test_fast_decode.py",
    "tests/models/test_compact.py",  # the int4 pack layout and the cache key differ per ATen capability
    "tests/models/test_compiled.py",  # a compiled step is built and keyed for the ATen capability
    "tests/weights/test_native.py",  # bitwise against torch's own casts and arithmetic, whichever kernels run them
    "tests/weights/test_matvec.py",  # which kernels decode depends on ATen's capability; the model against float32
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def numpy_found() -> list[str]:
    """NumPy's dispatched SIMD groups this machine supports (only those may be disabled)."""
    out = subprocess.run([sys.executable, "-c", "import numpy._core._multiarray_umath as m; "
                          "print(' '.join(k for k, v in m.__cpu_features__.items() if v))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def selections(flags: set[str], np_found: list[str]) -> list[tuple[str, dict[str, str], str | None]]:
    """(name, environment, reason it cannot run here or None)."""
    avx512, amx = "avx512f" in flags, "amx_bf16" in flags
    bf16 = "avx512_bf16" in flags
    np_avx512 = [f for f in ("X86_V4", "AVX512_ICL", "AVX512_SPR", "AVX512_SKX", "AVX512F", "AVX512CD",
                             "AVX512_CLX", "AVX512_CNL", "AVX512_KNL", "AVX512_KNM") if f in np_found]
    need = "needs an AVX-512 CPU: this machine cannot run the kernels it selects"
    return [
        ("numpy-avx2", {"NPY_DISABLE_CPU_FEATURES": " ".join(np_avx512)},
         None if np_avx512 else "NumPy found no AVX-512 paths to disable: it already runs its AVX2 ones"),
        ("onednn-avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, None if avx512 else "already the machine's own kind"),
        ("onednn-avx512-bf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
         None if bf16 else "needs AVX512-BF16" + ("" if avx512 else f"; {need}")),
        ("onednn-amx", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, None if amx else "needs AMX (amx_bf16)"),
        # ATen's capability goes with a matching oneDNN cap, as on a real CPU of that kind: lowering ATen's alone
        # on an AMX machine sends bf16 SDPA into oneDNN's AMX packing, which ATen then refuses (pack_vnni2) —
        # a combination no machine has
        ("aten-default", {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}, None),
        ("aten-avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, None),
        ("aten-avx512", {"ATEN_CPU_CAPABILITY": "avx512"}, None if avx512 else need),
        ("all-avx2", {"NPY_DISABLE_CPU_FEATURES": " ".join(np_avx512), "ONEDNN_MAX_CPU_ISA": "AVX2",
                      "ATEN_CPU_CAPABILITY": "avx2"},
         None if avx512 else "this machine is the AVX2 kind: the plain `make test` is this run"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="run only these selections")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    flags = cpu_flags()
    kind = "AVX-512 with AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2-only"
    print(f"CPU kind: {kind}; model: {_model_name()}", flush=True)
    chosen = selections(flags, numpy_found())
    if args.only:
        unknown = set(args.only) - {name for name, _, _ in chosen}
        if unknown:
            print(f"error: unknown selection(s) {sorted(unknown)}; choose from {[n for n, _, _ in chosen]}")
            return 2
        chosen = [c for c in chosen if c[0] in args.only]
    results = []
    for name, env, why_not in chosen:
        if why_not:
            results.append((name, "not run", why_not, 0.0))
            continue
        shown = " ".join(f"{k}={v!r}" for k, v in env.items())
        print(f"\n=== {name}: {shown}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SENSITIVE,
                                *args.pytest_args], cwd=ROOT, env={**os.environ, **env})
        results.append((name, "passed" if code == 0 else f"FAILED (exit {code})", shown, time.perf_counter() - start))
    print("\nselection            result        time   settings / reason")
    for name, result, detail, took in results:
        print(f"{name:<20} {result:<13} {took:5.0f} s  {detail}")
    return 0 if all(r[1] in ("passed", "not run") for r in results) else 1


def _model_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
