"""``qkv next`` — the next-token distribution after a text, at several temperatures side by side, and which
tokens top-k / top-p / min-p keep (qkv generate's own samplers, applied after temperature as it does)."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .common import add_model_arguments, emit, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text whose next token to show (with --chat: your message); - reads standard input")
    add_model_arguments(p)
    p.add_argument("--chat", action="store_true",
                   help="the text as a user message in the chat template: the first token of the reply")
    p.add_argument("--system", help="a system message (with --chat)")
    g = p.add_argument_group("temperatures and samplers")
    g.add_argument("--temperature", "-t", dest="temperatures", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                   metavar="T", help="one or more temperatures > 0, shown side by side (default 0.5 1 2)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (k >= 1; default off)")
    g.add_argument("--top-p", type=float, default=None, help="keep the smallest set reaching this mass, in (0, 1]")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below min-p x the top probability, in [0, 1]")
    p.add_argument("--show", type=int, default=10, metavar="N", help="list the N most likely tokens (default 10)")
    p.add_argument("--png", metavar="FILE", help="also draw the distributions as a PNG (FILE or a directory)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: bars side by side; json: the same numbers as structured data")


def run(args: argparse.Namespace) -> int:
    from ..generate.next import check_options, next_png, next_token_distribution, render_next

    # every option is checked before the model loads: a typo costs no load time
    check_options(args.temperatures, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, show=args.show)
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text:
        raise InputError("the text is empty: give some text to continue")
    if args.system and not args.chat:
        raise InputError("--system needs --chat")
    if args.dtype == "auto":
        args.dtype = "float32"  # one forward, no decode steps: the exact weights, without the int4 decode copies
    loaded = load_model(args)
    dist = next_token_distribution(loaded, text, temperatures=args.temperatures, top_k=args.top_k,
                                   top_p=args.top_p, min_p=args.min_p, top=args.show, chat=args.chat,
                                   system=args.system)
    return emit(args, dist, render_next, next_png)
