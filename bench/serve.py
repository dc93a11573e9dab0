"""`qkv serve` on SmolLM2: time to the first view, click-to-row round trips, and server memory.

    .venv/bin/python bench/serve.py [--lengths 2048 8192] [--clicks 40] [--threads 2]

For each length, a fresh server process (`qkv serve --port 0 --threads N`) on loopback:
  first view   POST /api/texts (one forward, the state kept) + the last token's row, as the page does
  plain        the same text's plain forward in a separate process (qkv, float32, logits of the last row)
  clicks       GET /api/texts/{id}/row for random tokens (seeded), measure norms, all layers and heads,
               word view — the round trip a click costs, p50 and p95
  memory       the server's RSS after the text minus its RSS with the model loaded (a first short text); and
               its peak (VmHWM) minus the same baseline: the forward's transients, returned afterwards
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as r:
        return json.loads(r.read())


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def text_of(tokens: int) -> str:
    import qkv

    m = qkv.load("smollm2", dtype="float32")
    base = ("The river bank was steep, and the old man sat on it every morning, watching the boats drift past "
            "while he told the children stories about the war, the flood and the winter the bridge fell. ")
    ids = m.tokenizer.encode(base * (tokens // 30 + 2))[:tokens]
    return m.tokenizer.decode(ids)


def plain_forward(text: str, threads: int) -> float:
    code = ("import sys, time, torch, qkv; torch.set_num_threads(%d); m = qkv.load('smollm2', dtype='float32'); "
            "ids = torch.tensor([m.tokenizer.encode(sys.stdin.read())]); "
            "m.model(ids[:, :16], last_only=True); t = []\n"
            "with torch.inference_mode():\n"
            "    for _ in range(3):\n"
            "        s = time.perf_counter(); m.model(ids, last_only=True); t.append(time.perf_counter() - s)\n"
            "print(sorted(t)[1])" % threads)
    r = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, cwd=ROOT, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def serve_case(text: str, clicks: int, threads: int) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "qkv", "serve", "--port", "0", "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+/", line).group(0).rstrip("/")
        _post(url + "/api/texts", {"text": "Hello there.", "model": "smollm2"})  # loads the model
        base = _rss_mib(proc.pid)
        start = time.perf_counter()
        t = _post(url + "/api/texts", {"text": text, "model": "smollm2"})
        n = len(t["tokens"])
        _get(f"{url}/api/texts/{t['id']}/row?query={n - 1}&measure=norms")
        first = time.perf_counter() - start
        rng, times = random.Random(0), []
        for _ in range(clicks):
            q = rng.randrange(n)
            s = time.perf_counter()
            _get(f"{url}/api/texts/{t['id']}/row?query={q}&measure=norms")
            times.append(time.perf_counter() - s)
        times.sort()
        return {"tokens": n, "first_s": first, "p50_ms": statistics.median(times) * 1e3,
                "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))] * 1e3,
                "extra_mib": _rss_mib(proc.pid) - base, "kept_mib": t["kept_mib"],
                "peak_extra_mib": _rss_mib(proc.pid, "VmHWM") - base}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"SmolLM2-135M float32, qkv serve on loopback, {args.threads} threads\n")
    print("| T | plain forward | first view (forward + state + last row) | first view / plain | click p50 | "
          "click p95 | server memory for the text (kept tensors) | peak during the forward |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        text = text_of(n)
        plain = plain_forward(text, args.threads)
        r = serve_case(text, args.clicks, args.threads)
        print(f"| {r['tokens']} | {plain:.2f} s | {r['first_s']:.2f} s | {r['first_s'] / plain:.2f}x | "
              f"{r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms | +{r['extra_mib']:.0f} MiB ({r['kept_mib']:.0f} MiB) | "
              f"+{r['peak_extra_mib']:.0f} MiB |",
              flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
