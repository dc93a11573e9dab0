"""``qkv embed-space`` — a token's nearest neighbours among the input embedding rows (cosine), and with
``--text``, the same word's hidden state after a layer in that text against the same rows, side by side."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("token", metavar="TOKEN",
                   help="a word that is exactly one token (e.g. bank, or ' bank' with its leading space)")
    add_model_arguments(p)
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="a text containing the word: compare its hidden state there with the embedding rows "
                        "(repeat for several texts side by side, e.g. 'river bank' and 'bank account')")
    p.add_argument("--layer", "-l", type=int, default=None, metavar="L",
                   help="with --text: the hidden state after layer L (0-based, -1 = last; default the middle layer)")
    p.add_argument("--occurrence", type=int, default=1, help="which occurrence of the word in each text (default 1)")
    p.add_argument("-k", type=int, default=10, help="how many neighbours to list (default 10)")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text: the lists side by side; json: the same as structured data")


def run(args: argparse.Namespace) -> int:
    from ..explain.embedding_view import check_options, embedding_space, render_embedding_space

    check_options(args.k, args.text, args.layer)  # before the model loads: a typo costs no load time
    if args.dtype == "auto":
        args.dtype = "float32"  # forwards of whole texts only: the exact weights, without the int4 decode copies
    loaded = load_model(args)
    space = embedding_space(loaded, args.token, texts=args.text, layer=args.layer, k=args.k,
                            occurrence=args.occurrence)
    if args.format == "json":
        print(json.dumps(space.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write(render_embedding_space(space))
    return 0
