"""``qkv explain`` — how much a word attends to every word of a sentence, in a real model."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .common import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the sentence, e.g. \"He sat on the river's bank\"")
    p.add_argument("--token", "-w", metavar="WORD",
                   help="the word whose attention to show (required, except for an encoder–decoder run: "
                        "there it picks one output token, by default all are shown as a heatmap)")
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
    if hasattr(loaded.config, "n_decoder_layers"):
        return _run_cross(loaded, args)
    if not args.token:
        raise InputError("--token WORD is required: which word's attention to show")
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


def _run_cross(loaded, args) -> int:
    """An encoder–decoder (``qkv train --task date``): each output token's cross-attention over the input."""
    from ..explain.capture import capture_cross
    from ..explain.render_text import bar_chart, heatmap, selection_label

    _check_range(loaded, args.layer, args.head)
    if args.no_sink or args.heatmap:
        raise InputError("--no-sink and --heatmap are for self-attention; an encoder–decoder's cross-attention "
                         "is shown as a heatmap already, with no sink token to drop")
    output, rec = capture_cross(loaded, args.text, layers=None if args.html else _one(args.layer),
                                heads=None if args.html else _one(args.head))
    w = _select(rec, args.layer, args.head)  # (Q, S)
    what = selection_label(rec, args.layer, args.head)
    query = _output_position(rec, args.token, args.occurrence) if args.token else None
    if args.format == "json":
        print(json.dumps({"model": rec.model, "text": args.text, "output": output, "kind": "cross",
                          "layer": args.layer, "head": args.head, "queries": [rec.query_tokens[q] for q in rec.queries],
                          "keys": rec.key_tokens, "weights": [[round(float(v), 6) for v in row] for row in w]},
                         ensure_ascii=False))
    elif query is None:
        sys.stdout.write(f"{args.text!r} -> {output!r}\n\n" + heatmap(
            rec.query_tokens, rec.key_tokens, w, title=f"cross-attention — {rec.model}, {what}; "
            "rows = output tokens, columns = input tokens"))
    else:
        sys.stdout.write(f"{args.text!r} -> {output!r}\n\n" + bar_chart(
            rec.key_tokens, w[query], title=f"output {args.token!r} attends to — {rec.model}, {what}, cross-attention"))
    if args.png:
        from ..explain.render_png import bar_chart_png, heatmap_png

        if query is None:
            heatmap_png(rec, args.png, layer=args.layer, head=args.head, words=False)
        else:
            bar_chart_png(rec.key_tokens, w[query].tolist(), args.png, title=f"output {args.token!r} attends to")
    if args.html:
        from ..explain.render_html import explorer_html
        from ..io import write_text

        write_text(args.html, explorer_html(rec, title=f"qkv explain — {rec.model} (cross-attention)",
                                            query=query if query is not None else 0))
    return 0


def _one(i):
    return None if i is None else [i]


def _select(rec, layer, head):
    w = rec.weights
    w = w[rec.index_of_layer(layer)][None] if layer is not None else w
    w = w[:, rec.index_of_head(head)][:, None] if head is not None else w
    return w.mean(dim=(0, 1))


def _output_position(rec, token: str, occurrence: int) -> int:
    hits = [i for i, t in enumerate(rec.query_tokens) if t == token]
    if len(hits) < occurrence:
        raise InputError(f"the output {''.join(rec.query_tokens)!r} has {len(hits)} token(s) {token!r}; "
                         f"choose one of its tokens")
    return hits[occurrence - 1]
