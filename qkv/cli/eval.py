"""``qkv eval DIR`` — the held-out metrics of a training run (exact match, or loss and perplexity)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="DIR", help="a run directory made by qkv train")
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="seq2seq tasks: which split (default test, never trained on)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples")
    p.add_argument("--beam", type=int, default=1, metavar="N", help="seq2seq: beam search with N beams (default 1 = greedy)")
    p.add_argument("--format", choices=["text", "json"], default="text")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..train.evaluate import evaluate_run
    from .common import startup_done

    startup_done()  # torch imported: the collector runs again for an evaluation that may take a while
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.beam < 1:
        raise InputError(f"--beam must be >= 1, got {args.beam}")
    result = evaluate_run(args.run, split=args.split, limit=args.limit, beam_size=args.beam)
    if args.format == "json":
        print(json.dumps(result))
        return 0
    print(f"{result['run']} ({result['task']}, {result['checkpoint']})")
    for key in ("split", "examples", "decoding", "windows", "tokens", "exact_match", "loss", "perplexity"):
        if key in result:
            v = result[key]
            print(f"  {key:12s} {v:.4f}" if isinstance(v, float) else f"  {key:12s} {v}")
    return 0
