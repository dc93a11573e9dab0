"""``qkv byhand`` — the self-attention exercise with every number shown."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from ..explain import byhand, byhand_render
from ..io import write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exact", action="store_true", help="only the exact computation (e^x, /√d_k)")
    mode.add_argument("--approx", action="store_true", help="only the classroom approximation (3^x, ⌊x/2⌋)")
    p.add_argument("--heads", type=int, default=1, help="number of heads (default 1; 2 gives 6 -> 6 multi-head)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="FILE.json", help='your own matrices: {"X": [...], "WQ": ..., "WK": ..., '
                     '"WV": ...} or {"X": ..., "heads": [{...}, ...]}; X has one row per token, each W is d_k x d_model')
    src.add_argument("--seed", type=int, help="a random small-integer example, reproducible from this seed")
    p.add_argument("--format", choices=["text", "markdown", "json", "html"], default="text")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of standard output")


def run(args: argparse.Namespace) -> int:
    if args.input:
        if args.heads != 1:
            raise InputError("--heads applies to the built-in examples; with --input, list the heads in the file")
        example = byhand.load_example(args.input)
    elif args.seed is not None:
        example = byhand.random_example(args.seed, n_heads=args.heads)
    else:
        example = byhand.default_example(args.heads)
    trace = byhand.compute(example)
    modes = ("exact",) if args.exact else ("approx",) if args.approx else ("exact", "approx")
    if args.format == "text" and not args.output:
        byhand_render.render_text(trace, modes)
        return 0
    if args.format == "json":
        text = dumps_matrices(byhand.to_json(trace, include_approx="approx" in modes)) + "\n"
    elif args.format == "markdown":
        text = byhand_render.render_markdown(trace, modes)
    elif args.format == "html":
        text = byhand_render.render_html(trace, modes)
    else:
        text = _text_to_string(trace, modes)
    if args.output:
        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def dumps_matrices(obj, indent: int = 0) -> str:
    """JSON with every list of numbers on one line, so that matrices read as rows."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(k)}: {dumps_matrices(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and obj and not all(isinstance(v, (int, float, str)) for v in obj):
        return "[\n" + ",\n".join(inner + dumps_matrices(v, indent + 2) for v in obj) + f"\n{pad}]"
    return json.dumps(obj)


def _text_to_string(trace, modes) -> str:
    from rich.console import Console

    console = Console(record=True, width=140, file=open("/dev/null", "w"), color_system=None)  # noqa: SIM115
    byhand_render.render_text(trace, modes, console=console)
    return console.export_text()
