"""SmolLM2-135M-Instruct end to end: qkv vs llama.cpp (where installed) and Hugging Face transformers.

    make llamacpp                      # once: llama.cpp built for this CPU, AMX off (bench/llamacpp_flags.py)
    .venv/bin/python bench/llm.py [--threads 2] [--new-tokens 128]

Each engine runs in a fresh process on the same GGUF file: qkv with dtype="auto" (the compact mode: int4
matrices, int8 unembedding, embedding rows from the mapped file; prompts on weights dequantised per call, in
bfloat16 on AMX CPUs) decoding through its compiled step (``qkv compile``, built once before the rounds, its
compile time reported) as ``qkv-auto`` and through the eager step (QKV_COMPILE=0) as ``qkv-eager``, and
dtype="float32" (exact weights, resident); transformers dequantises the file to
float32 (attn_implementation="sdpa"); llama-cpp-python runs the Q4_1 file as is. Per engine: load time (qkv's
compact cache warm), prefill tokens/s for 128- and 512-token prompts (median of 7), greedy decode tokens/s
over ``--new-tokens`` new tokens after a 16-token prompt, forced past end-of-sequence (median of 3), the
process's peak RSS, its baseline (right after importing its runtime: qkv, transformers or llama_cpp — the
llama.cpp process imports neither torch nor qkv) and the peak above it. Ratios are against llama.cpp, or
transformers without it. The whole set of engines runs ``--rounds`` times, interleaved; each figure is the
median over rounds (this 2-core machine is noisy: ±30 % on single timings).

Also: qkv's first load with an empty cache (re-packing) and warm; the main job (`qkv explain "He sat on the
river's bank" --token bank`, process start to exit, warm cache); the compact mode's accuracy against float32
(greedy tokens, perplexity of decode steps over 2,048 tokens, a 512-token prompt's logits); and, because
prefill against transformers is a near-tie that noise would decide, one process timing qkv (both dtypes) and
transformers' prefills in turns, ``--paired-reps`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

TEXT = ("The history of the transformer architecture begins with attention: a way for every token to look at "
        "every other token and decide what matters. Queries, keys and values are projections of the same "
        "hidden states; their dot products, scaled and normalised by a softmax, weigh the values. ")


def peak_rss_mb(field: str = "VmHWM") -> float:
    """The process's peak resident memory (VmHWM), or with field="VmRSS" the current one."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


BASELINE = {}  # the runtime's own resident memory right after its import, before the model is loaded


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

    from qkv import capture, generate, load  # noqa: F401  (`import qkv` is lazy: the runtime's modules, as before)

    BASELINE.setdefault("mb", peak_rss_mb("VmRSS"))
    t0 = time.perf_counter()
    m = load("smollm2", dtype=dtype, device="cpu")
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

    BASELINE.setdefault("mb", peak_rss_mb("VmRSS"))
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
    from llama_cpp import Llama  # this process imports neither torch nor qkv: its memory is llama.cpp's

    BASELINE.setdefault("mb", peak_rss_mb("VmRSS"))
    t0 = time.perf_counter()
    llm = Llama(model_path=os.environ["QKV_BENCH_GGUF"], n_ctx=1024, n_threads=threads, verbose=False)
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
    res["baseline_mb"] = BASELINE.get("mb", float("nan"))
    res["above_baseline_mb"] = res["peak_rss_mb"] - res["baseline_mb"]
    return res


ENGINES = ["qkv-auto", "qkv-eager", "qkv-float32", "transformers", "llama.cpp"]
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


def first_load() -> dict:
    """qkv.load("smollm2") with an empty cache (re-packing included) and then warm, in one process."""
    from qkv import load  # imported (torch with it) before the clock starts: the load alone is timed

    t0 = time.perf_counter()
    m = load("smollm2")
    cold = time.perf_counter() - t0
    assert m.info["compact_cache"].startswith("built"), m.info["compact_cache"]
    t0 = time.perf_counter()
    m = load("smollm2")
    return {"first_load_s": cold, "warm_load_s": time.perf_counter() - t0}


def long_prompt(n: int = 8000, new_tokens: int = 16) -> dict:
    """qkv-auto on an ``n``-token prompt (the standard library's textwrap source, repeated): prefill in chunks
    (qkv.generate.loop.PREFILL_CHUNK) and in one piece, seconds and peak RSS above the baseline of each."""
    import textwrap

    from qkv import load
    from qkv.generate import SamplingOptions, generate_ids, loop

    BASELINE.setdefault("mb", peak_rss_mb("VmRSS"))
    m = load("smollm2")
    ids = m.tokenizer.encode(Path(textwrap.__file__).read_text() * 4)[:n]
    t0 = time.perf_counter()
    list(generate_ids(m.model, ids, SamplingOptions(temperature=0), max_new_tokens=new_tokens))
    return {"tokens": len(ids), "chunk": loop.PREFILL_CHUNK, "seconds": time.perf_counter() - t0,
            "above_baseline_mb": peak_rss_mb() - BASELINE["mb"]}


def native_march(march: str | None) -> None:
    """Build qkv's native libraries (the dequantiser, the matrix-vector operators) for ``-march=<march>`` instead
    of this CPU: the AVX2 stand-in's C++ (``haswell``). None leaves them as they are."""
    if march:
        from qkv.weights import matvec, native

        for mod in (native, matvec):
            mod.FLAGS = tuple(f"-march={march}" if f == "-march=native" else f for f in mod.FLAGS)


def build_native() -> dict:
    """``qkv compile``'s C++ builds, timed, into the benchmark's cache, before anything loads the model: the native
    dequantiser of prompts and the native matrix-vector operators (a model decodes with them, and on an AVX2 CPU
    its compact cache holds the 4-bit operator's blocks)."""
    from qkv.weights import matvec, native

    return {"native_s": native.build(force=True), "matvec_s": matvec.build(force=True),
            "decodes": sorted(matvec.kernels())}


def compile_step() -> dict:
    """``qkv compile``'s decode step (export + AOTInductor), timed, into the benchmark's cache."""
    import qkv
    from qkv.models import compiled

    d = compiled.build(qkv.load("smollm2").model, force=True)
    return {"compile_s": d["compile_seconds"], "package_mb": d["bytes"] / 2**20, "self_check": d["self_check"]}


def accuracy(n_ppl: int = 2048) -> dict:
    """The compact mode (dtype="auto") against the float32 model on fixed texts: greedy tokens on this
    benchmark's prompt, perplexity of one-token decode steps over the first ``n_ppl`` tokens of the standard
    library's textwrap source (the test suite uses its first 512), and the error of a 512-token prompt's logits."""
    import textwrap

    import torch

    import qkv
    from qkv.generate import SamplingOptions, generate_ids

    c, e = qkv.load("smollm2"), qkv.load("smollm2", dtype="float32")
    out: dict = {"prompt_dtype": c.info["prompt_dtype"]}
    ids = prompt_ids(c.tokenizer.encode, 16)
    greedy = [list(generate_ids(m.model, ids, SamplingOptions(temperature=0), max_new_tokens=64)) for m in (c, e)]
    out["greedy_equal"] = i = next((i for i, (a, b) in enumerate(zip(*greedy)) if a != b), 64)
    if i < 64:  # the float32 model's logits of both tokens at the first divergence
        with torch.inference_mode():
            lg = e.model(torch.tensor([ids + greedy[1][:i]]))[0, -1]
        out["divergence_logits"] = [float(lg[greedy[1][i]]), float(lg[greedy[0][i]])]
    seq = torch.tensor([c.tokenizer.encode(Path(textwrap.__file__).read_text())[:n_ppl]])
    with torch.inference_mode():
        ref = e.model(seq)[0, :-1]
        cache = c.model.make_cache(1, seq.shape[1])
        got = torch.cat([c.model(seq[:, i:i + 1], cache=cache)[0] for i in range(seq.shape[1] - 1)])
        nll = lambda lg: float(torch.nn.functional.cross_entropy(lg.double(), seq[0, 1:]))  # noqa: E731
        out.update(ppl_float32=2.718281828459045 ** nll(ref), ppl_compact=2.718281828459045 ** nll(got),
                   decode_logits_max_err=float((got - ref).abs().max()), decode_logits_mean_err=float((got - ref).abs().mean()))
        p512 = seq[:, :512]
        a, b = c.model(p512), e.model(p512)
        lp, lq = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
        out.update(prompt_logits_max_err=float((a - b).abs().max()), prompt_logits_mean_err=float((a - b).abs().mean()),
                   prompt_mean_kl=float((lp.exp() * (lp - lq)).sum(-1).mean()))
    return out


def main_job(reps: int, env: dict) -> dict:
    """`qkv explain "He sat on the river's bank" --token bank`, from process start to exit (warm cache), taking
    turns with its floor: a process that only imports torch, with the collector paused as the command pauses it
    (qkv.cli.common.pause_gc), and leaves as the command does (no interpreter teardown); and the same command
    again with `qkv daemon` running (torch imported once, in the daemon). qkv's bytecode is written first, as
    ``make demo`` writes it. Each kind gets its own XDG_RUNTIME_DIR, so only the third finds the daemon."""
    cmd = [sys.executable, "-m", "qkv", "explain", "He sat on the river's bank", "--token", "bank"]
    floor = [sys.executable, "-c", "import gc, os; gc.disable(); import torch; os._exit(0)"]
    import qkv  # its bytecode written ahead, as `make demo` does (without it each run compiles qkv's sources)

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(qkv.__file__).parent)], check=True, env=env)
    with tempfile.TemporaryDirectory() as alone, tempfile.TemporaryDirectory() as warm:
        plain, served = dict(env, XDG_RUNTIME_DIR=alone), dict(env, XDG_RUNTIME_DIR=warm)
        subprocess.run(cmd, check=True, capture_output=True, env=plain)  # a first run: files in the page cache
        subprocess.run([sys.executable, "-m", "qkv", "daemon", "start"], check=True, capture_output=True, env=served)
        try:
            turns = {"main_job": ([], cmd, plain), "torch": ([], floor, plain), "daemon": ([], cmd, served)}
            for _ in range(reps):
                for out, argv, e in turns.values():
                    t0 = time.perf_counter()
                    subprocess.run(argv, check=True, capture_output=True, env=e)
                    out.append(time.perf_counter() - t0)
        finally:
            subprocess.run([sys.executable, "-m", "qkv", "daemon", "stop"], capture_output=True, env=served)
    res = {"reps": reps}
    for name, (times, _, _) in turns.items():
        res.update({f"{name}_s": statistics.median(times), f"{name}_min_s": min(times)})
    return res


def worker(engine: str, threads: int, new_tokens: int, reps: int) -> None:
    if engine == "llama.cpp":  # its process imports neither torch nor qkv: the memory measured is llama.cpp's
        print(json.dumps(run_llamacpp(new_tokens, threads)))
        return
    import torch

    torch.set_num_threads(threads)
    native_march(os.environ.get("BENCH_NATIVE_MARCH"))
    if engine == "first-load":
        res = first_load()
    elif engine == "accuracy":
        res = accuracy()
    elif engine.startswith("paired:"):
        res = paired_prefill(engine.split(":", 1)[1].split(","), reps)
    elif engine == "compile":
        res = compile_step()
    elif engine == "native":
        res = build_native()
    elif engine.startswith("long"):
        if engine == "long-whole":
            from qkv.generate import loop
            loop.PREFILL_CHUNK = 1 << 30
        res = long_prompt()
    elif engine == "qkv-eager":
        os.environ["QKV_COMPILE"] = "0"
        res = run_qkv("auto", new_tokens)
    elif engine.startswith("qkv-"):
        res = run_qkv(engine.split("-", 1)[1], new_tokens)
    else:
        res = run_transformers(new_tokens)
    print(json.dumps(res))


def _job_line(job: dict) -> str:
    return (f"median {job['main_job_s']:.2f} s, fastest {job['main_job_min_s']:.2f} s; a process that only imports torch, "
            f"in turns with it: median {job['torch_s']:.2f} s, fastest {job['torch_min_s']:.2f} s; the command with "
            f"`qkv daemon` running: median {job['daemon_s']:.2f} s, fastest {job['daemon_min_s']:.2f} s "
            f"({job['reps']} runs each)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--rounds", type=int, default=2, help="run every engine this many times, interleaved")
    ap.add_argument("--paired-reps", type=int, default=15,
                    help="repetitions of the paired prefill comparison (0 skips it; else at least 2)")
    ap.add_argument("--long", action="store_true",
                    help="only qkv-auto on an 8,000-token prompt, chunked and whole: time and memory")
    ap.add_argument("--main-job", type=int, metavar="N",
                    help="only the main job, N runs in turns with `import torch` alone, on the user's own (warm) cache")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.paired_reps == 1 or args.paired_reps < 0:
        ap.error("--paired-reps must be 0 (skip) or at least 2 (quartiles need two ratios)")
    if args.worker:
        worker(args.worker, args.threads, args.new_tokens, args.paired_reps)
        return
    if args.main_job is not None:
        if args.main_job < 1:
            ap.error(f"--main-job needs N >= 1 runs, got {args.main_job}")
        print(f"main job `qkv explain \"He sat on the river's bank\" --token bank`, process start to exit: "
              f"{_job_line(main_job(args.main_job, dict(os.environ)))}")
        return
    import tempfile

    from qkv.weights.embedded import embedded_path

    cache = tempfile.mkdtemp(prefix="qkv-bench-cache-")  # the compact cache: empty for first-load, then warm
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(args.threads),
               QKV_CACHE_DIR=cache, QKV_BENCH_GGUF=str(embedded_path("smollm2")))
    runs: dict[str, list[dict]] = {e: [] for e in args.engines}

    def run_worker(engine: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--paired-reps", str(args.paired_reps)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"skipped": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
        return json.loads(r.stdout.strip().splitlines()[-1])

    if args.long:
        run_worker("first-load")  # the compact cache filled (and nothing compiled): both runs load it warm
        for engine in ("long", "long-whole"):
            r = run_worker(engine)
            print(r if "skipped" in r else f"{engine}: {r['tokens']} tokens + 16 new, prefill chunk {r['chunk']}: "
                  f"{r['seconds']:.1f} s, peak {r['above_baseline_mb']:.0f} MiB above importing qkv's API")
        return
    natives = run_worker("native")
    print("native", natives, file=sys.stderr, flush=True)
    loads = run_worker("first-load")
    print("first-load", loads, file=sys.stderr, flush=True)
    built = run_worker("compile")
    print("compile", built, file=sys.stderr, flush=True)
    job = main_job(7, env)
    print("main job", job, file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for engine in args.engines:
            runs[engine].append(run_worker(engine))
            print(engine, runs[engine][-1], file=sys.stderr, flush=True)
    print_table({e: _median(rs) for e, rs in runs.items()}, args)
    acc = run_worker("accuracy")
    if "skipped" not in acc:
        div = acc.get("divergence_logits")
        tie = f" (then float32's logits of its token and of compact's: {div[0]:.3f} vs {div[1]:.3f})" if div else ""
        print(f"\nCompact mode (dtype=\"auto\") against float32: greedy tokens equal for {acc['greedy_equal']} of 64 on "
              f"this prompt{tie}; perplexity of decode steps over 2,048 tokens {acc['ppl_compact']:.4f} vs {acc['ppl_float32']:.4f} "
              f"({(acc['ppl_compact'] / acc['ppl_float32'] - 1) * 100:+.2f} %), logits error max {acc['decode_logits_max_err']:.3f} "
              f"mean {acc['decode_logits_mean_err']:.4f}; a 512-token prompt in {acc['prompt_dtype']}: logits error max "
              f"{acc['prompt_logits_max_err']:.3f} mean {acc['prompt_logits_mean_err']:.4f}, mean KL {acc['prompt_mean_kl']:.2e}")
    print(f"\nqkv.load(\"smollm2\"): first load (re-packing, empty cache) {loads.get('first_load_s', float('nan')):.2f} s, "
          f"warm {loads.get('warm_load_s', float('nan')):.2f} s; main job `qkv explain \"He sat on the river's bank\" "
          f"--token bank`, process start to exit: {_job_line(job)}")
    if "skipped" in built:
        print(f"compiled decode step: not built ({built['skipped']}); qkv-auto ran the eager step")
    else:
        print(f"`qkv compile` (once per model shape, torch build and CPU): the decode step (torch.export + AOTInductor) "
              f"{built['compile_s']:.1f} s, {built['package_mb']:.1f} MiB package; the step's self-check against the "
              f"eager step: largest difference {built['self_check']:.2g} of the logits' and cache writes' size")
    if "skipped" in natives:
        print(f"native libraries: not built ({natives['skipped']})")
    else:
        print(f"native libraries (g++): the prompts' dequantiser {natives['native_s']:.1f} s, the matrix-vector "
              f"operators {natives['matvec_s']:.1f} s; one-token steps use them for "
              f"{', '.join(natives['decodes']) or 'nothing'} here (q4: the 4-bit matrices, q8: the unembedding)")
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
    peer = "llama.cpp" if "skipped" not in results.get("llama.cpp", {"skipped": 1}) else "transformers"
    ref = results.get(peer, {})
    cols = [("load_s", "load (s)", "{:.2f}"), ("prefill128_tok_s", "prefill 128 (tok/s)", "{:.0f}"),
            ("prefill512_tok_s", "prefill 512 (tok/s)", "{:.0f}"), ("decode_tok_s", "decode (tok/s)", "{:.1f}"),
            ("above_baseline_mb", "peak RSS above baseline (MiB)", "{:.0f}"), ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}"),
            ("baseline_mb", "baseline (MiB)", "{:.0f}")]
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
            if key in ref and engine != peer and key in ("load_s", "prefill128_tok_s", "prefill512_tok_s",
                                                          "decode_tok_s", "above_baseline_mb"):
                ratio = ref[key] / r[key] if key == "load_s" else r[key] / ref[key]
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        print(f"| {engine} | " + " | ".join(cells) + " |")
    print(f"\n(ratios vs {peer}: speed / speed and memory / memory; for load, {peer}'s time / this time. Baseline: "
          "the process right after importing its runtime — qkv, transformers or llama_cpp — before loading)")


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
