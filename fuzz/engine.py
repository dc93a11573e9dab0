"""Run fuzz cases, each in a child forked from a parent that has already imported and warmed everything.

A case is (reader, seed, index): the child rebuilds its input from ``random.Random(f"{reader}:{seed}:{index}")``,
runs the reader on it and reports one outcome:

  loaded   the reader accepted the input (and its post-checks held)
  typed    a ``QkvError`` with a one-line message
  untyped  any other exception, a multi-line QkvError message, or a post-check that failed
           (e.g. a rendered template that shows an object's memory address)
  hang     still running at the wall-time limit (killed)
  memory   peak RSS grew more than the memory limit over the child's RSS at its start, or a MemoryError /
           failed allocation anywhere in the exception's chain (RLIMIT_AS caps the address space so a
           runaway allocation fails instead of taking the machine)
  crash    the child died of a signal it was not sent (segfault, abort)

``slow`` (over the time limit, under the hang limit) is counted beside the outcome. The child runs with one
torch thread and ``TOKENIZERS_PARALLELISM=false``: forking after thread pools exist is not safe.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import select
import shutil
import signal
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SLOW_S = 1.0
HANG_S = 5.0
MEMORY_MB = 256
ADDRESS_SPACE_MB = 3072  # RLIMIT_AS headroom over the child's address space at fork
KINDS = ("loaded", "typed", "untyped", "hang", "memory", "crash")


class Finding(Exception):
    """A reader's post-check failed (the input was accepted but the result is wrong)."""


_allowance = {"mb": 0.0, "s": 0.0}
_started: list[float] = []


def start_clock() -> None:
    """Called by a reader once its input is built: the case's time is qkv's time, not the mutator's."""
    _started.append(time.perf_counter())


def allow(*, mb: float = 0.0, s: float = 0.0) -> None:
    """Called by a reader inside a case whose *valid* input is large: memory and time linear in the input
    are allowed on top of the fixed limits (the text reader: ~0.6 KB and ~2 µs per byte of text)."""
    _allowance["mb"] += mb
    _allowance["s"] += s


@dataclass
class Outcome:
    index: int
    kind: str
    seconds: float
    rss_mb: float
    detail: str = ""
    label: str = ""  # what the mutator did
    slow_s: float = SLOW_S  # this case's time limit (SLOW_S plus what the reader allowed)


@dataclass
class Report:
    reader: str
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def counts(self) -> dict[str, int]:
        c = Counter(o.kind for o in self.outcomes)
        return {k: c.get(k, 0) for k in KINDS}

    def slow(self) -> int:
        return sum(1 for o in self.outcomes if o.kind in ("loaded", "typed", "untyped") and o.seconds > o.slow_s)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind not in ("loaded", "typed")]

    def signatures(self) -> dict[str, list[int]]:
        """Distinct failures (digits and paths blurred) -> case indexes."""
        out: dict[str, list[int]] = defaultdict(list)
        for o in self.failures():
            sig = re.sub(r"/\S+", "<path>", re.sub(r"\d+", "N", f"{o.kind}: {o.detail}"))[:200]
            out[sig].append(o.index)
        return dict(out)

    def to_json(self) -> dict[str, Any]:
        return {"reader": self.reader, "seed": self.seed, "cases": len(self.outcomes), "wall_s": round(self.wall_s, 1),
                **self.counts(), "slow": self.slow(),
                "max_seconds": round(max((o.seconds for o in self.outcomes), default=0), 3),
                "max_rss_mb": round(max((o.rss_mb for o in self.outcomes), default=0), 1),
                "failures": [vars(o) for o in self.failures()], "signatures": self.signatures(),
                "heaviest": [vars(o) for o in sorted(self.outcomes, key=lambda o: -o.rss_mb)[:5]],
                "slowest": [vars(o) for o in sorted(self.outcomes, key=lambda o: -o.seconds)[:5]]}


def case_rng(reader: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{reader}:{seed}:{index}")


def _statm_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _memory_in_chain(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def classify(exc: BaseException | None) -> tuple[str, str]:
    """(kind, detail) of a case that ended by returning (``exc`` None) or raising ``exc``."""
    from qkv.errors import QkvError

    if exc is None:
        return "loaded", ""
    text = str(exc)
    detail = f"{type(exc).__name__}: {' '.join(text.split())[:300]}"
    if _memory_in_chain(exc):
        return "memory", detail
    if isinstance(exc, QkvError) and text and "\n" not in text:
        return "typed", detail
    if isinstance(exc, QkvError):
        return "untyped", "multi-line message: " + detail
    if isinstance(exc, Finding):
        return "untyped", "post-check: " + detail
    tb = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "/qkv/" in f.filename), "")
    return "untyped", f"{detail} [{where}]"


def _child(run: Callable[[random.Random, Path], str], reader: str, seed: int, index: int, work: Path, wfd: int) -> None:
    """In the forked child: limits, one case, one JSON line to the parent, _exit."""
    try:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if "torch" in sys.modules:  # a thread pool does not survive fork: stay on this thread
            sys.modules["torch"].set_num_threads(1)
        import faulthandler
        import warnings

        faulthandler.disable()  # a crash is reported by the parent, not dumped on the test runner's stderr
        warnings.simplefilter("ignore")  # e.g. the code-key warning of a mutated config: noise here
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        rss0 = _statm_rss_mb()
        limit = _vm_size() + ADDRESS_SPACE_MB * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.write(wfd, (json.dumps({"rss0": rss0}) + "\n").encode())
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        label, exc = "", None
        try:
            label = run(case_rng(reader, seed, index), work) or ""
        except BaseException as e:  # noqa: BLE001 - everything is an outcome here
            exc = e
            label = getattr(e, "fuzz_label", "")
        seconds = time.perf_counter() - (_started[0] if _started else start)
        kind, detail = classify(exc)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        os.write(wfd, (json.dumps({"kind": kind, "detail": detail, "seconds": seconds, "peak": peak,
                                   "label": label[:200], "allow_mb": _allowance["mb"],
                                   "allow_s": _allowance["s"]}) + "\n").encode())
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(wfd, (json.dumps({"kind": "untyped", "detail": f"harness: {type(e).__name__}: {e}"[:300],
                                       "seconds": 0.0, "peak": 0.0}) + "\n").encode())
        except OSError:
            pass
    finally:
        os._exit(0)


@dataclass
class _Running:
    index: int
    pid: int
    rfd: int
    start: float
    work: Path
    buf: bytes = b""


def _finish(r: _Running, killed: bool) -> Outcome:
    _, status, usage = os.wait4(r.pid, 0)
    lines = [json.loads(line) for line in r.buf.decode(errors="replace").splitlines() if line.strip().startswith("{")]
    head = lines[0] if lines else {}
    rss0 = head.get("rss0", 0.0)
    end = lines[-1] if len(lines) > 1 else None
    seconds = time.monotonic() - r.start
    peak = usage.ru_maxrss / 1024
    grown = max(peak - rss0, 0.0)
    if killed:
        return Outcome(r.index, "hang", seconds, grown, f"killed after {HANG_S:g} s")
    if end is None:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        name = signal.Signals(sig).name if sig else f"exit {os.WEXITSTATUS(status)}"
        kind = "memory" if grown > MEMORY_MB else "crash"
        return Outcome(r.index, kind, seconds, grown, f"child died ({name})")
    kind = end["kind"]
    limit = MEMORY_MB + end.get("allow_mb", 0.0)
    if kind in ("loaded", "typed", "untyped") and grown > limit:
        kind, end["detail"] = "memory", f"peak RSS +{grown:.0f} MB (limit {limit:.0f}); {end['detail']}"
    return Outcome(r.index, kind, end["seconds"], grown, end["detail"], end.get("label", ""),
                   SLOW_S + end.get("allow_s", 0.0))


def run_cases(run: Callable[[random.Random, Path], str], reader: str, seed: int, indexes: list[int], *,
              jobs: int = 1, workdir: Path, progress: Callable[[Outcome], None] | None = None) -> Report:
    """Run every case index in forked children, ``jobs`` at a time; the parent only waits and reads."""
    report = Report(reader, seed)
    pending = list(reversed(indexes))
    running: dict[int, _Running] = {}
    t0 = time.monotonic()
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop()
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rfd)
                _child(run, reader, seed, index, workdir / f"w{os.getpid()}", wfd)
            os.close(wfd)
            running[rfd] = _Running(index, pid, rfd, time.monotonic(), workdir / f"w{pid}")
        now = time.monotonic()
        timeout = max(0.0, min(r.start + HANG_S for r in running.values()) - now)
        ready, _, _ = select.select(list(running), [], [], timeout)
        for rfd in ready:
            chunk = os.read(rfd, 65536)
            r = running[rfd]
            if chunk:
                r.buf += chunk
                continue
            os.close(rfd)
            del running[rfd]
            _record(report, r, _finish(r, killed=False), progress)
        now = time.monotonic()
        for rfd, r in list(running.items()):
            if now - r.start > HANG_S:
                os.kill(r.pid, signal.SIGKILL)
                os.close(rfd)
                del running[rfd]
                _record(report, r, _finish(r, killed=True), progress)
    report.wall_s = time.monotonic() - t0
    return report


def _record(report: Report, r: _Running, outcome: Outcome, progress: Callable[[Outcome], None] | None) -> None:
    shutil.rmtree(r.work, ignore_errors=True)
    report.outcomes.append(outcome)
    if progress is not None:
        progress(outcome)


def run_one(fn: Callable[[], Any], *, workdir: Path) -> Outcome:
    """One callable in a forked child under the same limits and classification as a fuzz case (for
    regression tests: the outcome, its time and its peak memory growth)."""
    report = run_cases(lambda rng, work: fn() and "", "one", 0, [0], workdir=workdir)
    return report.outcomes[0]
