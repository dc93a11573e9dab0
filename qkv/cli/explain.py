"""``qkv explain`` — how much a word attends to every word of a sentence, in a real model."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .common import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the sentence, e.g. \"He sat on the river's bank\"")
    p.add_argument("--token", "-w", required=True, metavar="WORD", help="the word whose attention to show")
    p.add_argument("--occurrence", type=int, default=1, help="which occurrence of WORD (default 1)")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, default=None, help="one layer (default: the mean over all layers)")
    p.add_argument("--head", type=int, default=None, help="one head (default: the mean over all heads)")
    p.add_argument("--tokens", action="store_true", help="token view (default: word view)")
    p.add_argument("--no-sink", action="store_true",
                   help="drop the first token (BOS / attention sink) and renormalise")
    p.add_argument("--heatmap", action="store_true",
                   help="also print the whole queries x keys heatmap of the chosen layer/head (token view)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--png", metavar="FILE", help="also write the bar chart as a PNG")
    p.add_argument("--html", metavar="FILE", help="also write the interactive HTML explorer")


def run(args: argparse.Namespace) -> int:
    from ..explain.capture import capture, word_positions
    from ..explain.render_text import bar_chart, view_title

    if args.occurrence < 1:
        raise InputError(f"--occurrence must be >= 1, got {args.occurrence}")
    loaded = load_model(args)
    layers = None if args.html else ([args.layer] if args.layer is not None else None)
    heads = None if args.html else ([args.head] if args.head is not None else None)
    _check_range(loaded, args.layer, args.head)
    positions = word_positions(loaded, args.text, args.token, args.occurrence)
    every_row = args.html or args.heatmap
    rec = capture(loaded, args.text, layers=layers, heads=heads, queries=None if every_row else positions)
    view = rec.without_sink() if args.no_sink else rec
    labels, values, highlight = _chart_data(view, positions, args)
    title = view_title(view, args.token, args.layer, args.head, not args.tokens)
    if args.format == "json":
        print(json.dumps({"model": rec.model, "text": args.text, "word": args.token, "occurrence": args.occurrence,
                          "view": "tokens" if args.tokens else "words", "layer": args.layer, "head": args.head,
                          "sink_removed": view.sink_removed, "keys": labels,
                          "weights": [round(float(v), 6) for v in values]}, ensure_ascii=False))
    else:
        sys.stdout.write(bar_chart(labels, values, title=title, highlight=highlight))
        if args.heatmap:
            sys.stdout.write("\n" + _heatmap(view, args))
    if args.png:
        from ..explain.render_png import bar_chart_png

        bar_chart_png(labels, values, args.png, title=title)
    if args.html:
        from ..explain.render_html import explorer_html
        from ..io import write_text

        write_text(args.html, explorer_html(rec, title=f"qkv explain — {rec.model}", query=positions[-1]))
    return 0


def _heatmap(rec, args) -> str:
    """Queries x keys of one layer/head (or their mean), token view."""
    from ..explain.render_text import heatmap, selection_label

    w = rec.weights
    w = w[rec.index_of_layer(args.layer)][None] if args.layer is not None else w
    w = w[:, rec.index_of_head(args.head)][:, None] if args.head is not None else w
    title = f"heatmap — {rec.model}, {selection_label(rec, args.layer, args.head)}; rows = queries, columns = keys"
    return heatmap([rec.query_tokens[q] for q in rec.queries], rec.key_tokens, w.mean(dim=(0, 1)), title=title)


def _check_range(loaded, layer, head) -> None:
    from ..explain.capture import _check_selection

    _check_selection(loaded, None if layer is None else [layer], None if head is None else [head])


def _chart_data(rec, positions, args):
    """Word view: mean over the query word's pieces, sum over each key word's pieces. Token view: the
    mean row of the word's pieces over key tokens."""
    import torch

    rows = torch.stack([rec.row(p, args.layer, args.head) for p in positions]).mean(0)
    if args.tokens:
        return list(rec.key_tokens), rows, None
    from ..explain.record import sum_over_words

    values = sum_over_words(rows, rec.key_words)
    # the query word's own bar (absent when it was the dropped sink token)
    own = [i for i, (a, b) in enumerate(rec.key_words) if a <= positions[0] - rec.sink_removed < b]
    return rec.word_labels("key"), values, own[0] if own else None
