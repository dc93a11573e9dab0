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
model's dequantised path, taking turns — the crossover ``COMPACT_ROWS_Q4`` and its kin are set from.

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
    through their dequantised weights, taking turns; the medians and their ratio. The products of one row (the
    last layer's after its attention, the unembedding's) stay compact either way, as in use."""
    import torch

    import qkv
    from qkv.nn.quant import CompactLinear

    text = "The quick brown fox jumps over the lazy dog, and the river keeps its own time. "
    times: dict[tuple, list[float]] = {}
    models = {}
    for choice in args.choices:
        os.environ["QKV_MATVEC"] = choice
        loaded = qkv.load("smollm2")
        mods = [m for name, m in loaded.model.named_modules() if isinstance(m, CompactLinear) and name != "lm_head"]
        ids = loaded.tokenizer.encode(text * (max(args.prompts) // 10 + 1))
        models[choice] = (loaded, mods, [m.small_m for m in mods], ids)
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # the first turn warms up, untimed
            for choice, (loaded, mods, small, ids) in models.items():
                for path in ("compact", "dequantised") if rep % 2 else ("dequantised", "compact"):
                    for n in args.prompts:
                        for m, s in zip(mods, small):  # dequantised: the n-row products (the last layer's
                            m.small_m = max(s, n) if path == "compact" else n - 1  # one-row ones stay compact)
                        x = torch.tensor([ids[:n]])
                        t0 = time.perf_counter()
                        loaded.model(x, last_only=True)
                        if rep:
                            times.setdefault((choice, path, n), []).append(time.perf_counter() - t0)
            for _, mods, small, _ in models.values():
                for m, s in zip(mods, small):
                    m.small_m = s
    print(f"\n{torch.backends.cpu.get_cpu_capability()} kernels, {args.threads} threads, median of {args.reps} turns "
          "(ms a prompt)\n")
    print("| QKV_MATVEC | kinds | tokens | compact (ms) | dequantised (ms) | compact / dequantised |")
    print("|---|---|---|---|---|---|")
    for choice, (_, mods, _, _) in models.items():
        kinds = ", ".join(sorted({m.kind for m in mods}))
        for i, n in enumerate(args.prompts):
            a, b = (1000 * statistics.median(times[(choice, p, n)]) for p in ("compact", "dequantised"))
            print(f"| {choice if i == 0 else ''} | {kinds if i == 0 else ''} | {n} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
