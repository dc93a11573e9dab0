"""A load test of `qkv serve` as a user runs it: the command in its own process on a free loopback port,
several clients at once clicking rows of their own ~1k-token texts while one more generates, bounded in
clients, requests and time. Every answer is checked against `qkv.capture`; after the clients leave (each
drops its text, as the page does), the server's resident memory is back near its baseline; Ctrl-C stops
it cleanly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import torch

import qkv
from tests.serve.test_serve import call, long_text

CLIENTS, CLICKS, TOKENS = 4, 12, 1000
MEASURES = ("weights", "norms")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _start_server():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qkv", "serve", "--port", "0", "--max-texts", "8",
                             "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "qkv serve: http://127.0.0.1:PORT/  (Ctrl-C stops it)"
    assert line.startswith("qkv serve: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
    return proc, line.split()[2].rstrip("/")


def test_concurrent_clients_correct_answers_and_memory_back_to_baseline(smollm2):
    rng = random.Random(0)
    texts = [long_text(smollm2, TOKENS + 40 * i)[40 * i:] for i in range(CLIENTS)]  # each client its own text
    plans, expected = [], []
    for text in texts:
        n = len(smollm2.tokenizer.encode(text))
        plan = [(rng.randrange(n), rng.randrange(30), rng.choice([None, rng.randrange(9)]), rng.choice(MEASURES))
                for _ in range(CLICKS)]
        rec = qkv.capture(smollm2, text, queries=sorted({q for q, *_ in plan}), measures=["norms"])
        plans.append(plan)
        expected.append([rec.row(q, layer, head, m) for q, layer, head, m in plan])
    proc, url = _start_server()
    try:
        warm = call(f"{url}/api/texts", {"text": texts[0]})[1]  # the model loaded and one text run: the baseline
        assert call(f"{url}/api/texts/{warm['id']}/row?query=5")[0] == 200
        assert call(f"{url}/api/texts/{warm['id']}", method="DELETE")[0] == 200
        time.sleep(0.5)
        baseline = _rss_mib(proc.pid)
        errors, peak = [], [baseline]

        def client(i: int):
            status, t = call(f"{url}/api/texts", {"text": texts[i]})
            if status != 200:
                return errors.append((i, "submit", t))
            for (q, layer, head, m), want in zip(plans[i], expected[i]):
                extra = "".join(f"&{k}={v}" for k, v in (("layer", layer), ("head", head)) if v is not None)
                status, row = call(f"{url}/api/texts/{t['id']}/row?query={q}&measure={m}&words=0{extra}")
                if status != 200 or not torch.allclose(torch.tensor(row["values"]), want, atol=1e-6, rtol=0):
                    errors.append((i, q, layer, head, m, status))
            peak.append(_rss_mib(proc.pid))
            if call(f"{url}/api/texts/{t['id']}", method="DELETE")[0] != 200:
                errors.append((i, "drop"))

        def generator():
            req = urllib.request.Request(f"{url}/api/generate", data=json.dumps(
                {"prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                events = r.read().decode()
            if "event: done" not in events:
                errors.append(("generate", events[-300:]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=generator))
        start = time.time()
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert not any(th.is_alive() for th in threads), "clients still running after 300 s"
        assert errors == [], errors
        elapsed = time.time() - start
        time.sleep(0.5)
        after = _rss_mib(proc.pid)
        kept = 0.118 * 1024 * CLIENTS  # ~118 MiB of q, k, v and norms' tables per 1k-token text
        print(f"load: {CLIENTS} clients x {CLICKS} clicks + a generation in {elapsed:.1f} s; RSS baseline "
              f"{baseline:.0f} MiB, peak {max(peak):.0f}, after {after:.0f}")
        assert after - baseline < 0.4 * kept, (baseline, max(peak), after)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the server did not stop on Ctrl-C within 30 s") from None
    err = proc.stderr.read()
    assert code == 0 and "qkv serve: stopped" in err and "Traceback" not in err, (code, err)
