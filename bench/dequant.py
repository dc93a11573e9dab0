"""A prompt's weights dequantised: every layer's matrices of SmolLM2-135M-Instruct (what one prompt longer than
the int4 kernels' crossover, or one exact analysis, dequantises) — eager (torch ops) against the native
dequantiser (qkv.weights.native), built for this CPU and, on an AVX-512 machine, with AVX2 code only
(``-march=haswell``: the stand-in for the AVX2-only kind). float32 (exact analyses; prompts on AVX2 machines)
and bfloat16 (prompts on AMX machines). Median of ``--reps`` passes, one process, torch's threads as set.

    .venv/bin/python bench/dequant.py [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    os.environ["QKV_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkv-bench-dequant-")
    os.environ["QKV_COMPILE"] = "auto"
    import torch

    import qkv
    from qkv.nn.quant import CompactLinear
    from qkv.weights import cache, native

    model = qkv.load("smollm2").model
    mats = [m for m in model.modules() if isinstance(m, CompactLinear)
            and m is not getattr(model, "lm_head", None)]  # the unembedding: never dequantised by a prompt
    values = sum(m.in_features * m.out_features for m in mats)
    avx512 = "avx512f" in cache.cpu_flags().split()
    builds = [("native", native.FLAGS)]
    if avx512:
        builds.append(("native, AVX2 code", tuple("-march=haswell" if f == "-march=native" else f for f in native.FLAGS)))
    print(f"{len(mats)} matrices, {values / 1e6:.1f} M values; torch threads {torch.get_num_threads()}; CPU "
          f"{'AVX-512' if avx512 else 'AVX2-only'}{' + AMX' if 'amx_bf16' in cache.cpu_flags() else ''}")
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        def one_pass():
            t0 = time.perf_counter()
            for m in mats:
                m._exact_fn(dtype)
            return time.perf_counter() - t0

        def timed():
            one_pass()
            return 1000 * statistics.median(one_pass() for _ in range(args.reps))
        os.environ["QKV_COMPILE"] = "0"
        ref = [m._exact_fn(dtype) for m in mats[:3]]
        rows[("eager (torch ops)", dtype)] = timed()
        os.environ["QKV_COMPILE"] = "auto"
        for name, flags in builds:
            native.FLAGS = flags
            native.build()
            assert all(torch.equal(a, m._exact_fn(dtype)) for a, m in zip(ref, mats))
            rows[(name, dtype)] = timed()
    print("| dequantiser | float32 ms | bfloat16 ms | float32 vs eager |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(n for n, _ in rows):
        f32, bf16 = rows[(name, torch.float32)], rows[(name, torch.bfloat16)]
        print(f"| {name} | {f32:.1f} | {bf16:.1f} | {rows[('eager (torch ops)', torch.float32)] / f32:.1f}x |")


if __name__ == "__main__":
    main()
