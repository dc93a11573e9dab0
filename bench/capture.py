"""Seeing attention at full speed: qkv capture of one query row vs Hugging Face output_attentions.

    .venv/bin/python bench/capture.py [--lengths 128 512 2048] [--threads 2]
    .venv/bin/python bench/capture.py --depth [--lengths 2048]

SmolLM2-135M-Instruct in float32, one forward over T prompt tokens, each case in a fresh process:
  plain        qkv's forward (SDPA), nothing captured
  qkv-capture  the same forward, capturing the last query's row in all 30 layers x 9 heads
  hf-plain     transformers' forward (sdpa)
  hf-eager     transformers with output_attentions=True (forces the eager path, returns every weight)
Time = median of repeated forwards; memory = peak RSS rise over the RSS with the model loaded, in a
fresh process per case. The capture/plain time ratio comes from one process that alternates plain and
capturing forwards on the same model (this 2-core machine drifts by tens of percent between runs, so
separate processes would measure the drift, not the capture).

--depth: `qkv.capture` of the last row with measures=["norms"], every layer against layers=[0], [15] and
[29] alone (the forward stops after the deepest chosen layer), in one process, taking turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ["plain", "qkv-capture", "hf-plain", "hf-eager"]


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_runner(case: str):
    import torch

    if case.startswith("hf"):
        from transformers import AutoModelForCausalLM

        from qkv.weights.embedded import embedded_path

        path = embedded_path("smollm2")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager" if case == "hf-eager" else "sdpa")
        model.eval()
        attn = case == "hf-eager"
        return lambda ids: model(ids, output_attentions=attn, use_cache=False, logits_to_keep=1), None
    import qkv
    from qkv.explain.capture import RowObserver

    m = qkv.load("smollm2", dtype="float32", device="cpu")
    plain = lambda ids: m.model(ids, last_only=True)  # noqa: E731
    capture = lambda ids: m.model(ids, last_only=True, observer=RowObserver(rows="last"))  # noqa: E731
    return plain if case == "plain" else capture, (plain, capture)


def worker(case: str, t: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    run, pair = make_runner(case)
    ids = torch.randint(100, 40000, (1, t), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        run(ids[:, :16])
        rss0 = _kb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        out = run(ids)
        first = time.perf_counter() - start
        peak = _kb("VmHWM:") - rss0
        del out
        times = [first]
        for _ in range(4 if t <= 512 else 2):
            start = time.perf_counter()
            run(ids)
            times.append(time.perf_counter() - start)
        res = {"median_s": statistics.median(times[1:]), "peak_extra_mb": peak / 1024}
        if case == "qkv-capture":
            res["interleaved_ratio"] = _interleaved_ratio(pair, ids, 9 if t <= 512 else 5)
    print(json.dumps(res))


def _interleaved_ratio(pair, ids, n: int) -> float:
    """median(capture) / median(plain) over n alternating runs of each in this process."""
    times: tuple[list, list] = ([], [])
    for _ in range(n):
        for i, fn in enumerate(pair):
            start = time.perf_counter()
            fn(ids)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


DEPTHS = (None, [0], [15], [29])


def depth(lengths: list[int], threads: int, turns: int = 3) -> None:
    """The capture's time by the deepest layer it is asked for: medians of ``turns`` rounds taking turns."""
    import torch

    import qkv

    torch.set_num_threads(threads)
    m = qkv.load("smollm2", dtype="float32", device="cpu")
    print(f"SmolLM2-135M float32, qkv.capture of the last row (norms), {threads} threads, median of {turns} "
          "turns\n")
    print("| T | every layer | layers=[0] | layers=[15] | layers=[29] |")
    print("|---|---|---|---|---|")
    for t in lengths:
        prose = "the river bank was steep and the old man sat on it watching boats drift past slowly " * (t // 8)
        text = m.tokenizer.decode(m.tokenizer.encode(prose)[:t])  # ~t tokens of prose
        times: dict[int, list[float]] = {i: [] for i in range(len(DEPTHS))}
        for _ in range(turns):
            for i, layers in enumerate(DEPTHS):
                start = time.perf_counter()
                qkv.capture(m, text, queries=[-1], layers=layers, measures=["norms"])
                times[i].append(time.perf_counter() - start)
        print(f"| {t} | " + " | ".join(f"{statistics.median(v):.2f} s" for v in times.values()) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--depth", action="store_true", help="capture time by the deepest layer asked for")
    args = ap.parse_args()
    if args.depth:
        return depth(args.lengths, args.threads)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.threads)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    print(f"SmolLM2-135M float32, one forward, {args.threads} threads\n")
    print("| T | plain | qkv capture (1 row, all layers x heads) | hf sdpa | hf output_attentions (eager) "
          "| capture / plain time | capture / hf-eager extra memory |")
    print("|---|---|---|---|---|---|---|")
    for t in args.lengths:
        res = {}
        for case in CASES:
            cmd = [sys.executable, __file__, "--worker", case, str(t), "--threads", str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            res[case] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
                {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:80]}
        print(_row(t, res), flush=True)


def _cell(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return f"{r['median_s'] * 1e3:.0f} ms / +{r['peak_extra_mb']:.0f} MiB"


def _row(t: int, res: dict) -> str:
    cap, eager = res["qkv-capture"], res["hf-eager"]
    ratio_t = f"{cap['interleaved_ratio']:.3f}x" if "error" not in cap else "—"
    ratio_m = (f"{cap['peak_extra_mb'] / eager['peak_extra_mb']:.3f}" if "error" not in cap and "error" not in eager
               and eager["peak_extra_mb"] > 0 else "—")
    return f"| {t} | " + " | ".join(_cell(res[c]) for c in CASES) + f" | {ratio_t} | {ratio_m} |"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
