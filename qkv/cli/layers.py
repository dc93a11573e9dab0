"""``qkv layers`` — what each layer does to one position of a text: the residual stream's norm, the shares
added by attention and the MLP, the RMSNorm scales, the SwiGLU gate, and the logit lens."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .common import add_model_arguments, emit, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..explain.lens import GATE_THRESHOLD

    p.add_argument("text", help="the text to run; - reads standard input")
    p.add_argument("--token", "-w", metavar="WORD", default=None,
                   help="the word whose position to follow (a word of several tokens: its last token; "
                        "default: the last token of the text, whose next token the model predicts)")
    p.add_argument("--occurrence", type=int, default=1, help="which occurrence of WORD (default 1)")
    add_model_arguments(p)
    p.add_argument("--top", type=int, default=5, help="tokens of each layer's logit lens to list (default 5)")
    p.add_argument("--gate-threshold", type=float, default=GATE_THRESHOLD,
                   help=f"a SwiGLU unit counts as active when |SiLU(gate)| exceeds this (default {GATE_THRESHOLD})")
    p.add_argument("--png", metavar="FILE",
                   help="also draw norms, shares and the logit-lens table (FILE or a directory)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: one line per layer with bars; json: the same numbers as structured data")


def run(args: argparse.Namespace) -> int:
    from ..explain.lens import check_options, layer_lens, layers_png, render_layers

    check_options(args.top, args.gate_threshold)  # before the model loads
    if args.occurrence < 1:
        raise InputError(f"--occurrence must be >= 1, got {args.occurrence}")
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise InputError("the text is empty: give a sentence to look at")
    if args.dtype == "auto":
        args.dtype = "float32"  # one forward of the whole text: the exact weights, without the int4 decode copies
    loaded = load_model(args)
    lens = layer_lens(loaded, text, word=args.token, occurrence=args.occurrence, top=args.top,
                      gate_threshold=args.gate_threshold)
    return emit(args, lens, render_layers, layers_png)
