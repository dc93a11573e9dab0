"""What the faithfulness measures cost: one qkv.capture per measure against a plain forward.

    .venv/bin/python bench/measures.py [--lengths 128 512 2048] [--threads 2] [--measures ...]

SmolLM2-135M-Instruct in float32, T prompt tokens (random ids, seeded), the last query's row:
  plain     qkv's forward with nothing captured (logits of the last position only, as capture asks)
  <measure> qkv.capture(loaded, text_ids, queries=[T-1], measures=[<measure>]) — weights and norms are
            per-layer measures of the captured row; mixing, rollout and logit need every layer's full map
            (built in row blocks, multiplied into one running T x T product).
Time: in one process, plain and capture alternate (this 2-core machine drifts between processes), median of
each (5 or, at T > 512, 2 plain forwards against the measure's first capture and 1 or 5 more), and their ratio. Memory: peak RSS rise over the loaded model during one capture, in a fresh process per
(measure, T), next to the plain forward's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from capture import _kb  # bench/capture.py's /proc/self/status reader (this script's folder is on sys.path)

MEASURES = ["weights", "norms", "logit", "mixing", "rollout", "alti-logit"]


def _runners(t: int):
    """plain(), measure(name)() and the token count of a text of about t tokens (random ids, decoded)."""
    import torch

    import qkv
    from qkv.explain import capture as cap

    m = qkv.load("smollm2", dtype="float32", device="cpu")
    text = m.tokenizer.decode(torch.randint(100, 40000, (t,), generator=torch.Generator().manual_seed(0)).tolist())
    ids = torch.tensor([m.tokenizer.encode(text)])  # the text's own tokens, what capture sees
    n = ids.shape[1]
    plain = lambda: m.model(ids, last_only=True)  # noqa: E731
    return plain, lambda name: (lambda: cap.capture(m, text, queries=[n - 1], measures=[name])), n


def worker(kind: str, t: int, threads: int, reps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    plain, measure, n = _runners(t)
    run = plain if kind == "plain" else measure(kind)
    with torch.inference_mode():
        plain()  # warm-up
        rss0 = _kb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        res = {"tokens": n, "peak_extra_mb": (_kb("VmHWM:") - rss0) / 1024}
        if kind != "plain":  # alternate: plain, capture, plain, capture, ..., plain (the first capture counts)
            plains, runs = [], [first]
            for i in range(reps):
                plains.append(_timed(plain))
                if i < reps - 1:
                    runs.append(_timed(run))
            res.update(plain_s=statistics.median(plains), measure_s=statistics.median(runs))
    print(json.dumps(res))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measures", nargs="+", default=MEASURES, choices=MEASURES)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        t = int(args.worker[1])
        worker(args.worker[0], t, args.threads, 5 if t <= 512 else 2)
        return
    print(f"SmolLM2-135M float32, one capture of the last row, {args.threads} threads\n")
    print("| T | measure | plain forward | capture | capture / plain | peak extra memory (plain → capture) |")
    print("|---|---|---|---|---|---|")
    for t in args.lengths:
        base = _run("plain", t, args.threads)
        for name in args.measures:
            r = _run(name, t, args.threads)
            if "error" in r or "error" in base:
                print(f"| {t} | {name} | failed: {r.get('error') or base.get('error')} |||||", flush=True)
                continue
            print(f"| {r['tokens']} | {name} | {r['plain_s'] * 1e3:.0f} ms | {r['measure_s'] * 1e3:.0f} ms | "
                  f"{r['measure_s'] / r['plain_s']:.2f}x | {base['peak_extra_mb']:.0f} → "
                  f"{r['peak_extra_mb']:.0f} MiB |", flush=True)


def _run(kind: str, t: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(t), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:100]}
    return json.loads(r.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
