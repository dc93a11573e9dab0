"""SmolLM2-135M-Instruct end to end: qkv vs Hugging Face transformers (and llama.cpp where installed).

    .venv/bin/python bench/llm.py [--threads 2] [--new-tokens 128]

Each engine runs in a fresh process on the same GGUF file (transformers dequantises it to float32 and
runs with attn_implementation="sdpa"; llama-cpp-python, if importable — ``make llamacpp`` builds it — runs
the Q4_1 file as is):
load time, prefill tokens/s for 128- and 512-token prompts (median of 7), greedy decode tokens/s over
``--new-tokens`` new tokens after a 16-token prompt (each engine's own KV cache, a plain loop; median
of 3 runs), and the process's peak RSS. This 2-core machine is noisy from run to run (±30 % seen on
single timings), hence the medians and ``--rounds``: the whole set of engines is run that many times,
interleaved, and each figure is the median over rounds. qkv runs twice: dtype="auto" (float32 weights + int4/float16 copies for
one-token steps) and dtype="float32" (exact weights only).

Then, because prefill is a near-tie that this noise would otherwise decide, one more process loads qkv
(both dtypes) and transformers together and times their prefills in turn, ``--paired-reps`` times: the
per-repetition ratios compare neighbours in time (see ``paired_prefill``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple

TEXT = ("The history of the transformer architecture begins with attention: a way for every token to look at "
        "every other token and decide what matters. Queries, keys and values are projections of the same "
        "hidden states; their dot products, scaled and normalised by a softmax, weigh the values. ")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(tokenize, n: int) -> list[int]:
    ids = tokenize(TEXT * (n // 20 + 2))
    return ids[:n]


class Opened(NamedTuple):
    load_s: float
    tok: Callable[[str], list[int]]
    prefill: Callable[[list[int]], Any]  # one prompt-only forward, last position's logits only
    model: Any


def open_qkv(dtype: str) -> Opened:
    """qkv.load("smollm2") and its prefill."""
    import torch

    import qkv

    t0 = time.perf_counter()
    m = qkv.load("smollm2", dtype=dtype, device="cpu")
    load_s = time.perf_counter() - t0

    def prefill(ids):
        with torch.inference_mode():
            m.model(torch.tensor([ids]), last_only=True)

    return Opened(load_s, m.tokenizer.encode, prefill, m.model)


def run_qkv(dtype: str, new_tokens: int) -> dict:
    from qkv.generate import SamplingOptions, generate_ids

    load_s, tok, prefill, model = open_qkv(dtype)

    def decode(ids):
        return list(generate_ids(model, ids, SamplingOptions(temperature=0), max_new_tokens=new_tokens))

    return measure(load_s, tok, prefill, decode)


def open_transformers() -> Opened:
    """transformers on the same GGUF (dequantised to float32, sdpa) and its prefill."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qkv.weights.embedded import embedded_path

    path = embedded_path("smollm2")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def prefill(ids):
        with torch.inference_mode():
            model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)

    return Opened(load_s, lambda s: hf_tok(s)["input_ids"], prefill, model)


def run_transformers(new_tokens: int) -> dict:
    import torch

    load_s, tok, prefill, model = open_transformers()

    def decode(ids):
        out = []
        with torch.inference_mode():
            res = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            for _ in range(new_tokens):
                nxt = res.logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
                res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
        return out

    return measure(load_s, tok, prefill, decode)


def run_llamacpp(new_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    from qkv.weights.embedded import embedded_path

    t0 = time.perf_counter()
    llm = Llama(model_path=str(embedded_path("smollm2")), n_ctx=1024, n_threads=threads, verbose=False)
    load_s = time.perf_counter() - t0
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False)  # noqa: E731

    def prefill(ids):
        llm.reset()
        llm.eval(ids)

    def decode(ids):
        llm.reset()
        out = []
        for t in llm.generate(ids, temp=0.0, top_k=1):
            out.append(t)
            if len(out) == new_tokens:
                break
        return out

    return measure(load_s, tok, prefill, decode)


def measure(load_s, tok, prefill, decode) -> dict:
    res = {"load_s": load_s}
    for n in (128, 512):
        ids = prompt_ids(tok, n)
        prefill(ids)  # warm-up
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            prefill(ids)
            times.append(time.perf_counter() - t0)
        res[f"prefill{n}_tok_s"] = n / statistics.median(times)
    ids = prompt_ids(tok, 16)
    decode(ids[:4])  # warm-up
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = decode(ids)
        rates.append(len(out) / (time.perf_counter() - t0))
    res["decode_tok_s"] = statistics.median(rates)
    res["decoded"] = len(out)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


ENGINES = ["qkv-auto", "qkv-float32", "transformers", "llama.cpp"]
PAIRED = ["qkv-auto", "qkv-float32", "transformers"]


def paired_prefill(engines: list[str], reps: int) -> dict:
    """Prefill timings with every engine loaded in one process, taking turns on each repetition.

    Separate processes measured minutes apart see this shared 2-core machine at different speeds (±20 %
    between runs); here each repetition times every engine back to back on the same prompt, so a ratio
    is taken between neighbours in time. Returns, per engine and prompt length, the median time and the
    per-repetition ratios (transformers' time / the engine's time) as median, lowest quartile and highest.
    """
    import torch

    opened = {e: open_qkv(e.split("-", 1)[1]) if e.startswith("qkv-") else open_transformers() for e in engines}
    tok = opened[engines[0]].tok  # the same GGUF vocabulary for every engine
    out = {}
    with torch.inference_mode():
        for n in (128, 512):
            ids = prompt_ids(tok, n)
            times = {e: [] for e in engines}
            for rep in range(reps + 1):
                for e in engines:
                    t0 = time.perf_counter()
                    opened[e].prefill(ids)
                    if rep:  # the first round warms up
                        times[e].append(time.perf_counter() - t0)
            for e in engines:
                r = {"ms": statistics.median(times[e]) * 1e3}
                if "transformers" in times and e != "transformers":
                    ratios = sorted(b / a for a, b in zip(times[e], times["transformers"]))
                    q = statistics.quantiles(ratios, n=4)
                    r.update(ratio=statistics.median(ratios), q1=q[0], q3=q[2], lo=ratios[0], hi=ratios[-1])
                out[f"{e}/{n}"] = r
    return out


def worker(engine: str, threads: int, new_tokens: int, reps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if engine.startswith("paired:"):
        res = paired_prefill(engine.split(":", 1)[1].split(","), reps)
    elif engine.startswith("qkv-"):
        res = run_qkv(engine.split("-", 1)[1], new_tokens)
    elif engine == "transformers":
        res = run_transformers(new_tokens)
    else:
        res = run_llamacpp(new_tokens, threads)
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--rounds", type=int, default=2, help="run every engine this many times, interleaved")
    ap.add_argument("--paired-reps", type=int, default=15,
                    help="repetitions of the paired prefill comparison (0 skips it; else at least 2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paired_reps == 1 or args.paired_reps < 0:
        ap.error("--paired-reps must be 0 (skip) or at least 2 (quartiles need two ratios)")
    if args.worker:
        worker(args.worker, args.threads, args.new_tokens, args.paired_reps)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {e: [] for e in args.engines}

    def run_worker(engine: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--paired-reps", str(args.paired_reps)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"skipped": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    for _ in range(args.rounds):
        for engine in args.engines:
            runs[engine].append(run_worker(engine))
            print(engine, runs[engine][-1], file=sys.stderr, flush=True)
    print_table({e: _median(rs) for e, rs in runs.items()}, args)
    paired = [e for e in args.engines if e in PAIRED]
    if args.paired_reps > 0 and "transformers" in paired and len(paired) > 1:
        res = run_worker("paired:" + ",".join(paired))
        print(res if "skipped" in res else "", file=sys.stderr, flush=True)
        if "skipped" not in res:
            print_paired(res, paired, args)


def _median(rs: list[dict]) -> dict:
    ok = [r for r in rs if "skipped" not in r]
    if not ok:
        return rs[0]
    return {k: statistics.median(r[k] for r in ok) for k in ok[0]}


def print_table(results: dict, args) -> None:
    ref = results.get("transformers", {})
    cols = [("load_s", "load (s)", "{:.2f}"), ("prefill128_tok_s", "prefill 128 (tok/s)", "{:.0f}"),
            ("prefill512_tok_s", "prefill 512 (tok/s)", "{:.0f}"), ("decode_tok_s", "decode (tok/s)", "{:.1f}"),
            ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}")]
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, decode over {args.new_tokens} new tokens, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| engine | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for engine, r in results.items():
        if "skipped" in r:
            print(f"| {engine} | not run: {r['skipped']} |" + " |" * (len(cols) - 1))
            continue
        cells = []
        for key, _, f in cols:
            cell = f.format(r[key])
            if key in ref and engine != "transformers" and key != "peak_rss_mb":
                ratio = r[key] / ref[key] if key != "load_s" else ref[key] / r[key]
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        print(f"| {engine} | " + " | ".join(cells) + " |")
    print("\n(ratios vs transformers: speed / speed; for load, transformers' time / this time — higher is better)")


def print_paired(res: dict, engines: list[str], args) -> None:
    print(f"\nPaired prefill: all engines in one process, taking turns, {args.paired_reps} repetitions; "
          "speed-up = transformers' time / the engine's time per repetition: median [quartiles] (lowest–highest)\n")
    print("| engine | prefill 128 (ms) | speed-up at 128 | prefill 512 (ms) | speed-up at 512 |")
    print("|---|---|---|---|---|")
    for e in engines:
        cells = []
        for n in (128, 512):
            r = res[f"{e}/{n}"]
            cells.append(f"{r['ms']:.0f}")
            cells.append(f"{r['ratio']:.3f}x [{r['q1']:.3f}–{r['q3']:.3f}] ({r['lo']:.2f}–{r['hi']:.2f})"
                         if "ratio" in r else "—")
        print(f"| {e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
