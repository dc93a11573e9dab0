"""Decoding's matrix kernels, taking turns in one process: qkv's native matrix-vector operators (qkv.weights.matvec:
``q4_mv`` on the file's 4-bit blocks, ``q8_mv`` on the int8 unembedding) against torch's int4/int8 kernels.

For each ``QKV_MATVEC`` choice given (default: auto, torch, native) SmolLM2 is loaded in the compact mode and its
compiled decode step built into a scratch cache (about a minute each, not timed); then

* every one-token product of a step — the 120 matrices of the layers and the unembedding — timed alone, by kind,
  the models taking turns (the medians of ``--reps`` turns), and
* the whole compiled decode step (``qkv.models.compiled.step_times``, median of 48 steps), taking turns.

    .venv/bin/python bench/decode_kernels.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/decode_kernels.py --march haswell
        # the AVX2 stand-in: torch's AVX2 kernels, and qkv's libraries built with AVX2 code only

``--prompts 4 8 16 24 32 48`` times short prompts instead (no compiled step): for each choice, each length's
prefill with the compact matrices (their small kernels, whatever rows they are set for) against the same
model's dequantised path, taking turns, one choice after the other — what ``qkv compile`` measures to set this
machine's crossover (qkv.weights.crossover), and the defaults ``COMPACT_ROWS_Q4`` and its kin were set from.

2 threads (``--threads``). The figures are this machine's; they move by ±20 % from one minute to the next, which
is why the sides take turns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("choices", nargs="*", default=["auto", "torch", "native"], help="QKV_MATVEC values to compare")
    ap.add_argument("--reps", type=int, default=10, help="turns of each timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--march", help="build qkv's native libraries for this -march (the AVX2 stand-in: haswell)")
    ap.add_argument("--prompts", type=int, nargs="+", metavar="N", help="time prompts of these lengths instead")
    args = ap.parse_args()
    if args.reps < 1 or not set(args.choices) <= {"auto", "torch", "native"}:
        ap.error("--reps must be >= 1 and the choices among auto, torch, native")
    if args.prompts and min(args.prompts) < 1:
        ap.error("--prompts lengths must be >= 1")
    os.environ.setdefault("QKV_CACHE_DIR", tempfile.mkdtemp(prefix="qkv-bench-kernels-"))
    os.environ["QKV_COMPILE"] = "auto"
    import torch

    torch.set_num_threads(args.threads)
    from llm import native_march  # bench/llm.py, beside this script

    from qkv.weights import matvec, native

    native_march(args.march)
    native.build()
    matvec.build()
    import qkv
    from qkv.models import compiled
    from qkv.nn.quant import small_matmul

    if args.prompts:
        return prompts(args)
    models = {}
    for choice in args.choices:
        os.environ["QKV_MATVEC"] = choice
        m = qkv.load("smollm2").model
        d = compiled.build(m)
        models[choice] = m
        print(f"QKV_MATVEC={choice}: native kinds {sorted(matvec.kernels()) or 'none'}; compiled step "
              f"{'built' if d['built'] else 'cached'}, its check {d['self_check']:.2g}", file=sys.stderr, flush=True)

    def products(m) -> dict[str, list]:
        by_kind: dict[str, list] = {}
        for row in m.decode_weights():
            for item in row:
                if not isinstance(item, torch.Tensor):
                    by_kind.setdefault(item[0], []).append(item)
        return by_kind

    xs = {k: torch.randn(1, k) for k in (576, 1536)}
    ops = {c: products(m) for c, m in models.items()}
    k_of = {"q4": lambda g, ts: ts[0].shape[1] // (20 if g == 1 else 18) * 32, "int4": lambda g, ts: ts[1].shape[0] * g}
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.reps):
            for c, by_kind in ops.items():
                for kind, items in by_kind.items():
                    t0 = time.perf_counter()
                    for _, group, ts in items:
                        k = k_of[kind](group, ts) if kind in k_of else ts[0].shape[1]
                        small_matmul(xs[k], kind, group, *ts)
                    times.setdefault((c, kind), []).append(time.perf_counter() - t0)
        steps: dict[str, list[float]] = {c: [] for c in models}
        for _ in range(max(3, args.reps // 2)):
            for c, m in models.items():
                steps[c].append(compiled.step_times(m, 48)["compiled"])
    print(f"\n{torch.backends.cpu.get_cpu_capability()} kernels, {args.threads} threads, median of {args.reps} turns "
          "(ms a decode step)\n")
    print("| QKV_MATVEC | kind | matrices | products alone (ms) | compiled decode step (ms) |")
    print("|---|---|---|---|---|")
    for c, by_kind in ops.items():
        for i, (kind, items) in enumerate(by_kind.items()):
            step = f"{statistics.median(steps[c]):.2f} (fastest {min(steps[c]):.2f})" if i == 0 else ""
            print(f"| {c if i == 0 else ''} | {kind} | {len(items)} | {1000 * statistics.median(times[(c, kind)]):.2f} "
                  f"| {step} |")


def prompts(args) -> None:
    """Each choice's prefill of ``args.prompts`` tokens through the layers' compact matrices' small kernels and
    through their dequantised weights, taking turns (qkv.weights.crossover.measure, what ``qkv compile`` runs
    to set this machine's crossover); the medians, their ratio and the crossover chosen from them."""
    import torch

    import qkv
    from qkv.weights import crossover

    print(f"\n{torch.backends.cpu.get_cpu_capability()} kernels, {args.threads} threads, median of {args.reps} turns "
          "(ms a prompt)\n")
    print("| QKV_MATVEC | kinds | tokens | compact (ms) | dequantised (ms) | compact / dequantised |")
    print("|---|---|---|---|---|---|")
    chosen = {}
    for choice in args.choices:
        os.environ["QKV_MATVEC"] = choice
        model = qkv.load("smollm2").model
        kinds = ", ".join(sorted({m.kind for m in crossover.layer_matrices(model)}))
        timed = crossover.measure(model, args.prompts, args.reps)
        chosen[choice] = crossover.choose(timed)
        for i, (n, (a, b)) in enumerate(timed.items()):
            print(f"| {choice if i == 0 else ''} | {kinds if i == 0 else ''} | {n} | {1000 * a:.1f} | {1000 * b:.1f} "
                  f"| {a / b:.2f} |")
    print("\ncrossover (qkv.weights.crossover.choose): " + ", ".join(f"{c} {n} rows" for c, n in chosen.items()))


if __name__ == "__main__":
    main()
