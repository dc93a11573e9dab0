"""Options shared by the subcommands that run a model."""

from __future__ import annotations

import argparse
import gc

_GC_PAUSED = False


def pause_gc() -> None:
    """Pause Python's garbage collector for a command's start-up (called by the ``qkv`` command only, never
    by the library): importing torch and loading a model create ~180,000 objects that all live on, and the
    collector's passes over them (three full ones, hundreds of young ones) cost 0.2-0.3 s of a 2 s command,
    for no garbage. :func:`startup_done` moves them out of its reach and resumes it."""
    global _GC_PAUSED
    if gc.isenabled():
        gc.disable()
        _GC_PAUSED = True


def resume_gc() -> None:
    """The collector as it was, nothing frozen: for a command that ends in an error before its start-up did."""
    global _GC_PAUSED
    if _GC_PAUSED:
        gc.enable()
        _GC_PAUSED = False


def startup_done() -> None:
    """After the start-up (imports, the model's load): what exists now is frozen — never examined again by
    the collector, as gc.freeze() is meant for — and the collector runs again for whatever the command does
    next (a chat, a long generation). Does nothing unless :func:`pause_gc` paused it."""
    global _GC_PAUSED
    if _GC_PAUSED:
        gc.freeze()
        gc.enable()
        _GC_PAUSED = False


def add_model_arguments(p: argparse.ArgumentParser, default: str = "smollm2") -> None:
    p.add_argument("--model", "-m", default=default,
                   help=f"embedded model name (smollm2, minilm), a .gguf file or a Hugging Face directory (default {default})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights (auto: a GGUF model on the CPU stays compact — int4/int8, what generation runs on — "
                        "and analyses use its exact float32 weights; float32: the exact weights, resident)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (auto = cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's choice)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=256, help="at most this many new tokens (default 256)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT appears (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, max_new_tokens=args.max_new_tokens,
                stop=tuple(args.stop))


def load_model(args: argparse.Namespace):
    """Validate what can be validated without the model (sampling options), then load it."""
    import torch

    from ..errors import InputError
    from ..generate.sampling import SamplingOptions
    from ..load import load

    if hasattr(args, "temperature"):
        SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype=args.dtype, device=args.device)
    startup_done()
    return loaded


def emit(args: argparse.Namespace, view, render, png=None) -> int:
    """A lecture command's output: the figure first (``--png``, with ``png(view, path)``), then the view as
    JSON (``view.to_dict()``, ``--format json``) or as text (``render(view)``)."""
    import json
    import sys

    if png is not None and getattr(args, "png", None):
        print(f"[qkv: wrote {png(view, args.png)}]", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(view.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write(render(view))
    return 0
