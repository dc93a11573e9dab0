"""Attention paths side by side: qkv reference / tiled / sdpa / auto vs the plain course formula.

    .venv/bin/python bench/attention.py [--lengths 128 512 2048 8192 16384] [--threads 2]

fp32, B=1, H=8, D=64, T=S, causal and not. Each measurement runs in a fresh process: peak extra memory
is the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS with the
inputs allocated, during the first call; time is the median of the following calls. A path whose
memory need would not fit in this machine's RAM is reported as skipped, with the estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

B, H, D = 1, 8, 64
IMPLS = ["plain", "reference", "tiled", "sdpa", "auto", "sdpa_direct"]
OVERHEAD = "auto-vs-direct"  # a worker that alternates impl="auto" and a direct SDPA call in one process


def plain_formula(q, k, v, causal):
    """The course formula exactly as written: softmax(Q Kᵀ / √d) V (with a causal mask if asked)."""
    import torch

    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def make_fn(impl, causal):
    import torch.nn.functional as F

    from qkv import attention

    if impl == "plain":
        return lambda q, k, v: plain_formula(q, k, v, causal)
    if impl == "sdpa_direct":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda q, k, v: attention(q, k, v, causal=causal, impl=impl)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def overhead_worker(t, causal, threads):
    """median(auto) / median(direct SDPA), alternating the two calls so that drift cancels."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for _ in range(3))
    fns = (make_fn("auto", causal), make_fn("sdpa_direct", causal))
    for fn in fns:  # warm-up: first-touch allocations and thread pools are not what is compared
        fn(q, k, v)
    times = ([], [])
    n = 400 if t <= 512 else 20 if t <= 2048 else 5
    for _ in range(n):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn(q, k, v)
            times[i].append(time.perf_counter() - start)
    print(json.dumps({"ratio": statistics.median(times[0]) / statistics.median(times[1])}))


def worker(impl, t, causal, reps, threads):
    import torch

    if impl == OVERHEAD:
        return overhead_worker(t, causal, threads)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, t, D, generator=g) for _ in range(3))
    fn = make_fn(impl, causal)
    small = [x[:, :, :64].contiguous() for x in (q, k, v)]
    fn(*small)  # load kernels, allocate thread pools
    rss0 = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    start = time.perf_counter()
    out = fn(q, k, v)
    first = time.perf_counter() - start
    peak = _status_kb("VmHWM:") - rss0
    del out
    times = [first]
    budget = time.perf_counter() + 20  # at most ~20 s of repeats per point
    for _ in range(reps - 1):
        if time.perf_counter() > budget:
            break
        start = time.perf_counter()
        fn(q, k, v)
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    print(json.dumps({"peak_kb": peak, "median_s": statistics.median(steady), "n": len(steady)}))


def estimated_bytes(impl, t):
    """Rough peak need of the T x S-materialising paths, to skip what cannot fit."""
    matrix = B * H * t * t * 4
    return {"plain": 2.1 * matrix, "reference": 4 * matrix}.get(impl, 0)


def available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(impl, t, causal, threads):
    need = estimated_bytes(impl, t)
    if need > 0.9 * available_bytes():
        return {"skipped": f"needs ~{need / 2**30:.0f} GiB"}
    reps = 101 if t <= 512 else 7 if t <= 2048 else 3
    cmd = [sys.executable, __file__, "--worker", impl, str(t), str(int(causal)), str(reps), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"skipped": f"failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt_time(r):
    if "skipped" in r:
        return r["skipped"]
    return f"{r['median_s'] * 1e3:.1f} ms" if "median_s" in r else "?"


def fmt_mem(r):
    return "—" if "skipped" in r else f"{r['peak_kb'] / 1024:.1f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192, 16384])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write raw results to this file")
    ap.add_argument("--only-overhead", action="store_true",
                    help="measure only the alternating auto-vs-direct SDPA ratio (fast)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, t, causal, reps, threads = args.worker
        worker(impl, int(t), bool(int(causal)), int(reps), int(threads))
        return
    results = {}
    print(f"fp32, B={B}, H={H}, D={D}, T=S, {args.threads} threads; time = median, memory = peak extra RSS\n")
    print("| T | causal | " + " | ".join(IMPLS) + " | tiled/sdpa time | auto/sdpa_direct time (alternating) "
          "| tiled/plain memory |")
    print("|---|---|" + "---|" * (len(IMPLS) + 3))
    for t in args.lengths:
        for causal in (False, True):
            impls = [] if args.only_overhead else IMPLS
            row = {impl: measure(impl, t, causal, args.threads) for impl in impls + [OVERHEAD]}
            row.update({impl: {"skipped": "not run"} for impl in IMPLS if impl not in row})
            results[f"{t}-{int(causal)}"] = row
            print(_row(t, causal, row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _ratio(a, b, key):
    if key not in a or key not in b or not b[key]:
        return "—"
    return f"{a[key] / b[key]:.2f}x"


def _row(t, causal, row):
    cells = [f"{fmt_time(row[i])} / {fmt_mem(row[i])}" for i in IMPLS]
    over = row[OVERHEAD]
    overhead = f"{over['ratio']:.3f}x" if "ratio" in over else "—"
    return (f"| {t} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " | "
            f"{_ratio(row['tiled'], row['sdpa'], 'median_s')} | {overhead} | "
            f"{_ratio(row['tiled'], row['plain'], 'peak_kb')} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
