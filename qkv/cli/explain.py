"""``qkv explain`` — how much a word attends to every word of a sentence, in a real model."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .common import add_model_arguments, load_model

DEFAULT_MEASURE = "norms"  # weights overstate attention sinks; norms weigh each weight by what it moves
TOP = 30  # bars drawn in the terminal for a long text (--top, --all)
MEASURE_NAMES = ("weights", "norms", "mixing", "rollout", "logit", "alti-logit")  # = qkv.explain.measures.MEASURES
PREDICTION = ("logit", "alti-logit")  # explain one next-token prediction; --target/--foil go with them


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the sentence, e.g. \"He sat on the river's bank\"")
    p.add_argument("--token", "-w", metavar="WORD",
                   help="the word whose attention to show (required, except with --measure logit/alti-logit: "
                        "there it picks the position whose next-token prediction is explained, default the last; "
                        "and for an encoder–decoder run: there it picks one output token, by default all are "
                        "shown as a heatmap)")
    p.add_argument("--occurrence", type=int, default=1, help="which occurrence of WORD (default 1)")
    add_model_arguments(p)
    p.add_argument("--layer", type=int, default=None, help="one layer (default: the mean over all layers)")
    p.add_argument("--head", type=int, default=None, help="one head (default: the mean over all heads)")
    p.add_argument("--measure", default=DEFAULT_MEASURE, metavar="M[,M...]",
                   help="what to show: norms (default: ‖α·W_O v‖, what the heads actually take from each token), "
                        "weights (the raw softmax weights), mixing (ALTI: each token's share of the output, residual "
                        "and norms included), rollout (a baseline), logit (each position's contribution to the next "
                        "token's logit), alti-logit (the same carried back to input tokens through ALTI); several "
                        "separated by commas, or 'all' — the chart shows the first, --format json carries each")
    p.add_argument("--target", metavar="TOKEN", help="with --measure logit or alti-logit: the token whose logit "
                   "is explained (default: the model's top prediction); mind the leading space, e.g. ' are'")
    p.add_argument("--foil", metavar="TOKEN", help="with --measure logit or alti-logit: explain logit(target) - "
                   "logit(foil), e.g. --target ' are' --foil ' is'")
    p.add_argument("--tokens", action="store_true", help="token view (default: word view)")
    p.add_argument("--no-sink", action="store_true",
                   help="drop the first token (BOS / attention sink) and renormalise")
    p.add_argument("--heatmap", action="store_true",
                   help="also print the whole queries x keys heatmap of the chosen layer/head (token view)")
    p.add_argument("--top", type=int, default=TOP, metavar="N",
                   help=f"a text with more than N keys: draw the N largest bars (in text order) and count the "
                        f"rest (default {TOP}; JSON and CSV always carry every key)")
    p.add_argument("--all", action="store_true", help="draw every key's bar, however long the text")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--png", metavar="FILE", help="also write the bar chart as a PNG")
    p.add_argument("--html", metavar="FILE", help="also write the interactive HTML explorer")


def run(args: argparse.Namespace) -> int:
    from ..explain.capture import capture, word_positions
    from ..explain.render_text import bar_chart, measure_title

    if args.occurrence < 1:
        raise InputError(f"--occurrence must be >= 1, got {args.occurrence}")
    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    measures = _measures(args)
    loaded = load_model(args)
    if hasattr(loaded.config, "n_decoder_layers"):
        return _run_cross(loaded, args)
    primary = measures[0]
    if not args.token and primary not in PREDICTION:
        raise InputError("--token WORD is required: which word's attention to show")
    layers = None if args.html else ([args.layer] if args.layer is not None else None)
    heads = None if args.html else ([args.head] if args.head is not None else None)
    _check_range(loaded, args.layer, args.head)
    positions = word_positions(loaded, args.text, args.token, args.occurrence) if args.token else \
        [len(loaded.tokenizer.encode(args.text)) - 1]
    predicts = any(m in PREDICTION for m in measures)
    if predicts:
        positions = positions[-1:]  # the prediction is made at the word's last piece
    every_row = args.html or args.heatmap
    rec = capture(loaded, args.text, layers=layers, heads=heads, measures=measures, target=args.target,
                  foil=args.foil, queries=positions if not every_row else
                  (list(range(positions[-1] + 1)) if predicts else None))
    view = rec.without_sink() if args.no_sink else rec
    charts = {m: _chart_data(view, positions, args, m) for m in dict.fromkeys([*measures, "weights"])}
    labels, values, highlight = charts[primary]
    title = measure_title(view, primary, args.token or rec.key_tokens[positions[-1]], args.layer, args.head,
                          not args.tokens)
    if args.format == "json":
        print(json.dumps(_json(args, rec, view, measures, charts), ensure_ascii=False))
    else:
        sys.stdout.write(bar_chart(labels, values, title=title, highlight=highlight,
                                   marks=_sink_marks(view, args), signed=primary in PREDICTION,
                                   top=None if args.all else args.top))
        sys.stdout.write(_notes(view, primary))
        if args.heatmap:
            sys.stdout.write("\n" + _heatmap(view, args, primary))
    if args.png:
        from ..explain.render_png import bar_chart_png
        from ..explain.render_text import top_keys

        keep = top_keys([float(v) for v in values], None if args.all else args.top, [highlight])
        short = f", top {args.top} of {len(labels)} keys" if len(keep) < len(labels) else ""
        bar_chart_png([labels[i] for i in keep], [float(values[i]) for i in keep], args.png, title=title + short)
    if args.html:
        from ..explain.render_html import explorer_html
        from ..io import write_text

        write_text(args.html, explorer_html(rec, title=f"qkv explain — {rec.model}", query=positions[-1],
                                            measure=primary))
    return 0


def _heatmap(rec, args, measure: str) -> str:
    """Queries x keys of one layer/head (or the measure's mean or model view), token view."""
    from ..explain.render_text import heatmap, selection_label

    what = "" if measure == "weights" else f"{measure}, "
    title = (f"heatmap — {rec.model}, {what}{selection_label(rec, args.layer, args.head)}; rows = queries, "
             "columns = keys")
    return heatmap([rec.query_tokens[q] for q in rec.queries], rec.key_tokens,
                   rec.values(measure, args.layer, args.head), title=title)


def _measures(args) -> list[str]:
    """--measure as a list, the chart's measure first; --target/--foil only with logit."""
    names = [DEFAULT_MEASURE, *MEASURE_NAMES] if args.measure.strip() == "all" else \
        [m.strip() for m in args.measure.split(",") if m.strip()]
    bad = [m for m in names if m not in MEASURE_NAMES]
    if bad or not names:
        raise InputError(f"--measure {bad[0] if bad else args.measure!r} is not one of {', '.join(MEASURE_NAMES)} "
                         "(or 'all')")
    if (args.target is not None or args.foil is not None) and not set(names) & set(PREDICTION):
        raise InputError("--target and --foil go with --measure logit or alti-logit (the next-token prediction "
                         "they compare)")
    return list(dict.fromkeys(names))


def _sink_marks(rec, args) -> dict[int, str]:
    """Bar index -> mark for the keys detected as sinks (word view: the word holding the sink token)."""
    marks = {}
    for s in rec.sinks:
        j = s["position"]
        if not args.tokens and rec.key_words:
            j = next(i for i, (a, b) in enumerate(rec.key_words) if a <= j < b)
        marks[j] = "sink"
    return marks


def _notes(rec, measure: str) -> str:
    """Lines under the chart: each sink with its reason; the logit's remainder; which measure is a baseline."""
    from ..explain.render_text import terminal_label

    lines = [f"  sink: {terminal_label(s['token'].strip() or s['token'])} {s['why']}" for s in rec.sinks]
    if measure in PREDICTION:
        info = rec.measure(measure).info
        lines.append(f"  tokens explain {info['logit_difference'] - info['remainder']:+.3f} of the logit difference "
                     f"{info['logit_difference']:+.3f}; the remainder {info['remainder']:+.3f} is the MLPs' and "
                     "biases' own part")
    if measure == "rollout":
        lines.append("  rollout is a baseline: it multiplies raw weights through the layers and ignores what the "
                     "values carry")
    return "".join(line + "\n" for line in lines)


def _json(args, rec, view, measures, charts) -> dict:
    from ..explain.measures import DEFINITIONS

    labels, values, _ = charts["weights"]
    out = {"model": rec.model, "text": args.text, "word": args.token, "occurrence": args.occurrence,
           "view": "tokens" if args.tokens else "words", "layer": args.layer, "head": args.head,
           "sink_removed": view.sink_removed, "keys": labels, "measure": measures[0],
           "weights": [round(float(v), 6) for v in values], "measures": {}, "sinks": view.sinks}
    for m in measures:
        entry = {"definition": DEFINITIONS[m], "values": [round(float(v), 6) for v in charts[m][1]]}
        if m in PREDICTION:
            entry.update(view.measure(m).info)
        out["measures"][m] = entry
    return out


def _check_range(loaded, layer, head) -> None:
    from ..explain.capture import _check_selection

    _check_selection(loaded, None if layer is None else [layer], None if head is None else [head])


def _chart_data(rec, positions, args, measure: str = "weights"):
    return rec.chart(positions, layer=args.layer, head=args.head, words=not args.tokens, measure=measure)


def _run_cross(loaded, args) -> int:
    """An encoder–decoder (``qkv train --task date``): each output token's cross-attention over the input."""
    from ..explain.capture import capture_cross
    from ..explain.render_text import bar_chart, heatmap, selection_label

    _check_range(loaded, args.layer, args.head)
    if args.no_sink or args.heatmap:
        raise InputError("--no-sink and --heatmap are for self-attention; an encoder–decoder's cross-attention "
                         "is shown as a heatmap already, with no sink token to drop")
    measures = _measures(args)
    if args.measure.strip() == "all":
        measures = [m for m in measures if m in CROSS_MEASURES]
    output, rec = capture_cross(loaded, args.text, layers=None if args.html else _one(args.layer),
                                heads=None if args.html else _one(args.head), measures=measures)
    w = rec.values(measures[0], args.layer, args.head)  # (Q, S)
    what = selection_label(rec, args.layer, args.head)
    if measures[0] == "norms":
        where = f"layer {args.layer}" if args.layer is not None else \
            f"layer {rec.layers[0]}" if len(rec.layers) == 1 else f"mean of {len(rec.layers)} layers"
        who = f"head {args.head}" if args.head is not None else "norm of the sum over heads"
        what = f"norms ‖α·W_O v‖ as shares, {where}, {who}"
    if measures[0] == "mixing":
        what = f"mixing (ALTI) of layer {args.layer}'s cross-attention, the rest is the decoder's residual" \
            if args.layer is not None else "mixing (ALTI+) through every layer: each output state's source part, " \
            "the rest is the target prefix's"
    query = _output_position(rec, args.token, args.occurrence) if args.token else None
    rest = _cross_rest(rec, args.layer) if "mixing" in measures else None  # (Q,) the part no source token has
    if args.format == "json":
        from ..explain.measures import DEFINITIONS

        rows = lambda t: [[round(float(v), 6) for v in row] for row in t]  # noqa: E731
        print(json.dumps({"model": rec.model, "text": args.text, "output": output, "kind": "cross",
                          "layer": args.layer, "head": args.head, "queries": [rec.query_tokens[q] for q in rec.queries],
                          "keys": rec.key_tokens, "measure": measures[0],
                          "weights": rows(rec.values("weights", args.layer, args.head)),
                          "measures": {m: {"definition": DEFINITIONS[m], "values": rows(rec.values(m, args.layer,
                                                                                                  args.head)),
                                           **({"residual" if args.layer is not None else "target_share":
                                               [round(float(v), 6) for v in rest]} if m == "mixing" else {})}
                                       for m in measures}}, ensure_ascii=False))
    elif query is None:
        sys.stdout.write(f"{args.text!r} -> {output!r}\n\n" + heatmap(
            rec.query_tokens, rec.key_tokens, w, title=f"cross-attention — {rec.model}, {what}; "
            "rows = output tokens, columns = input tokens"))
    else:
        sys.stdout.write(f"{args.text!r} -> {output!r}\n\n" + bar_chart(
            rec.key_tokens, w[query], title=f"output {args.token!r} attends to — {rec.model}, {what}, cross-attention"))
        if measures[0] == "mixing":
            whose = "the decoder's own state (residual)" if args.layer is not None else \
                "the target prefix (<bos> and the outputs before it)"
            sys.stdout.write(f"  {whose} makes up the remaining {float(rest[query]):.3f}\n")
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
                                            query=query if query is not None else 0, measure=measures[0]))
    return 0


CROSS_MEASURES = ("weights", "norms", "mixing")  # what an encoder–decoder's cross-attention gives


def _cross_rest(rec, layer):
    """Per output token, the share no source token has: the residual's at one layer, else the target prefix's."""
    info = rec.measure("mixing").info
    return info["residual"][rec.index_of_layer(layer)] if layer is not None else info["target_share"]


def _one(i):
    return None if i is None else [i]


def _output_position(rec, token: str, occurrence: int) -> int:
    hits = [i for i, t in enumerate(rec.query_tokens) if t == token]
    if len(hits) < occurrence:
        raise InputError(f"the output {''.join(rec.query_tokens)!r} has {len(hits)} token(s) {token!r}; "
                         f"choose one of its tokens")
    return hits[occurrence - 1]
