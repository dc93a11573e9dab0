"""``python -m fuzz``: the structure-aware fuzz campaign over qkv's readers of untrusted input.

    python -m fuzz                                  # every reader, 10,000 cases each (make fuzz)
    python -m fuzz --reader template --cases 500    # one reader
    python -m fuzz --reader gguf --replay 1234      # one case in this process, with its traceback
    python -m fuzz --reader gguf --replay 1234 --save /tmp/case   # ... and its input files kept

Prints one table row per reader (cases, loaded, typed, untyped, hangs, memory blow-ups, crashes, slow) and
every distinct failure with the case indexes that show it; exits 1 if any case failed. ``--report`` writes
the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fuzz import engine, readers

HEADER = f"{'reader':12s} {'cases':>6s} {'loaded':>7s} {'typed':>6s} {'untyped':>8s} {'hangs':>6s} {'memory':>7s} " \
         f"{'crash':>6s} {'slow>1s':>8s} {'max s':>6s} {'max MB':>7s} {'wall s':>7s}"


def row(report: engine.Report) -> str:
    c, j = report.counts(), report.to_json()
    return (f"{report.reader:12s} {len(report.outcomes):6d} {c['loaded']:7d} {c['typed']:6d} {c['untyped']:8d} "
            f"{c['hang']:6d} {c['memory']:7d} {c['crash']:6d} {report.slow():8d} {j['max_seconds']:6.2f} "
            f"{j['max_rss_mb']:7.0f} {report.wall_s:7.0f}")


def campaign(names: list[str], cases: int, seed: int, jobs: int, root: Path, *, start: int = 0,
             quiet: bool = False) -> list[engine.Report]:
    readers.prepare(root, single_thread=True)
    reports = []
    for name in names:
        done = [0]

        def progress(_: engine.Outcome) -> None:
            done[0] += 1
            if not quiet and done[0] % 1000 == 0:
                print(f"  {name}: {done[0]}/{cases}", file=sys.stderr, flush=True)

        reports.append(engine.run_cases(readers.runner(name), name, seed, list(range(start, start + cases)),
                                        jobs=jobs, workdir=root / "work", progress=progress))
        if not quiet:
            print(row(reports[-1]), flush=True)
    return reports


def replay(name: str, seed: int, index: int, root: Path, save: Path | None) -> int:
    readers.prepare(root, single_thread=True)
    work = root / "replay"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        label = readers.runner(name)(engine.case_rng(name, seed, index), work)
        print(f"loaded ({time.perf_counter() - start:.2f} s): {label}")
        code = 0
    except BaseException as e:  # noqa: BLE001
        kind, detail = engine.classify(e)
        print(f"{kind} ({time.perf_counter() - start:.2f} s): {getattr(e, 'fuzz_label', '')}\n{detail}")
        if kind != "typed":
            traceback.print_exc()
        code = 0 if kind == "typed" else 1
    if save is not None:
        shutil.copytree(work, save, dirs_exist_ok=True, symlinks=True)
        print(f"input saved in {save}")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--reader", action="append", choices=readers.READERS, help="repeatable; default: all")
    ap.add_argument("--cases", type=int, default=10_000, help="cases per reader (default 10,000)")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once (each in its own child)")
    ap.add_argument("--report", type=Path, help="write the results as JSON here")
    ap.add_argument("--replay", type=int, metavar="INDEX", help="run one case in this process")
    ap.add_argument("--save", type=Path, help="with --replay: keep the case's input files here")
    args = ap.parse_args(argv)
    names = args.reader or list(readers.READERS)
    root = Path(tempfile.mkdtemp(prefix="qkv-fuzz-"))
    try:
        if args.replay is not None:
            return replay(names[0], args.seed, args.replay, root, args.save)
        print(f"qkv fuzz: {args.cases} cases per reader, seed {args.seed}, {args.jobs} job(s); limits: hang "
              f"{engine.HANG_S:g} s, slow {engine.SLOW_S:g} s, memory +{engine.MEMORY_MB} MB", flush=True)
        print(HEADER, flush=True)
        t0 = time.monotonic()
        reports = campaign(names, args.cases, args.seed, args.jobs, root, start=args.start)
        print(f"total wall time {time.monotonic() - t0:.0f} s")
        failed = False
        for r in reports:
            for sig, idx in sorted(r.signatures().items(), key=lambda kv: -len(kv[1])):
                failed = True
                print(f"[{r.reader}] {len(idx)}x {sig}  (cases {', '.join(map(str, idx[:8]))})")
        for r in reports:
            slow = sorted((o for o in r.outcomes if o.kind in ("loaded", "typed", "untyped") and o.seconds > o.slow_s),
                          key=lambda o: -o.seconds)
            for o in slow[:5]:
                print(f"[{r.reader}] slow {o.seconds:.2f} s, case {o.index} ({o.kind}): {o.label[:120]} -> {o.detail[:120]}")
        if args.report:
            args.report.write_text(json.dumps([r.to_json() for r in reports], indent=1, default=str))
        return 1 if failed else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
