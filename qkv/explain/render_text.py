"""Terminal renderers: the bar chart of one query's attention, and a heatmap. Pure functions -> str."""

from __future__ import annotations

import torch

from .record import AttentionRecord

_EIGHTHS = " ▏▎▍▌▋▊▉█"
_SHADES = " ░▒▓█"


def bar(value: float, width: int) -> str:
    """A horizontal bar of ``value`` in [0, 1] at 1/8-character resolution."""
    cells = max(0.0, min(1.0, value)) * width
    full, rest = int(cells), int((cells - int(cells)) * 8)
    return "█" * full + (_EIGHTHS[rest] if rest and full < width else "")


def terminal_label(s: str) -> str:
    """Token/word text made visible in one terminal cell row: whitespace and control characters escaped."""
    out = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    out = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in out)
    return out if out.strip() else repr(s)


def selection_label(rec: AttentionRecord, layer: int | None, head: int | None) -> str:
    """'layer 3, mean of 9 heads' — which weights a view shows."""
    n_l, n_h = len(rec.layers), len(rec.heads)
    where = f"layer {layer}" if layer is not None else f"layer {rec.layers[0]}" if n_l == 1 else f"mean of {n_l} layers"
    who = f"head {head}" if head is not None else f"head {rec.heads[0]}" if n_h == 1 else f"mean of {n_h} heads"
    sink = ", first token (sink) removed, renormalised" if rec.sink_removed else ""
    return f"{where}, {who}{sink}"


def view_title(rec: AttentionRecord, query_label: str, layer: int | None, head: int | None, words: bool) -> str:
    """The bar chart's title: who attends, in which model, which weights, which view."""
    view = "word view" if words else "token view"
    sel = selection_label(rec, layer, head)
    if rec.sink_removed:  # keep the sink note last, after the view
        sel, sink = sel.split(", first token", 1)
        return f"{query_label!r} attends to — {rec.model}, {sel}, {view}, first token{sink}"
    return f"{query_label!r} attends to — {rec.model}, {sel}, {view}"


def bar_chart(labels: list[str], values: torch.Tensor, *, title: str = "", width: int = 40,
              highlight: int | None = None, marks: dict[int, str] | None = None, signed: bool = False,
              top: int | None = None) -> str:
    """One row per key: label, bar scaled to the largest value, the value (3 decimals).

    ``marks`` adds a word after a row's value (e.g. "sink"); ``signed`` scales by the largest magnitude and
    draws negative values with a light bar and a sign, for contributions that can oppose. ``top``: with
    more keys than that, only the ``top`` largest (by magnitude) are drawn, in text order, plus the query's
    own and the marked ones; each run of keys left out is one "⋮" line with its count and total."""
    vals = [float(v) for v in values]
    biggest = max((abs(v) for v in vals), default=0.0) if signed else max(vals, default=0.0)
    biggest = biggest if biggest > 0 else 1.0
    keep = top_keys(vals, top, [highlight, *(marks or {})])
    shown = [terminal_label(labels[i]) for i in keep]
    pad = max((len(s) for s in shown), default=0)
    lines = [title] if title else []
    prev = -1
    for i, lab in zip(keep, shown):
        if i > prev + 1:
            lines.append(_gap(vals[prev + 1:i], pad, width, signed))
        v = vals[i]
        mark = "▶" if i == highlight else " "
        drawn = "░" * round(abs(v) / biggest * width) if signed and v < 0 else bar(abs(v) / biggest, width)
        num = f"{v:+.3f}" if signed else f"{v:.3f}"
        note = f"  ◀ {marks[i]}" if marks and i in marks else ""
        lines.append(f"{mark} {lab.ljust(pad)}  {drawn.ljust(width)}  {num}{note}")
        prev = i
    if prev < len(vals) - 1:
        lines.append(_gap(vals[prev + 1:], pad, width, signed))
    return "\n".join(lines) + "\n"


def _gap(values: list[float], pad: int, width: int, signed: bool) -> str:
    """One line for a run of keys left out: how many, and their total."""
    what = f"{len(values)} more key" + ("s" if len(values) != 1 else "")
    return f"  {'⋮'.ljust(pad)}  {what.ljust(width)}  {sum(values):{'+' if signed else ''}.3f} in total"


def top_keys(values: list[float], top: int | None, always=()) -> list[int]:
    """Indices of the bars to draw, in text order: all of them, or the ``top`` largest by magnitude and
    the ``always`` ones (None entries ignored)."""
    if top is None or len(values) <= top:
        return list(range(len(values)))
    largest = sorted(range(len(values)), key=lambda i: -abs(values[i]))[:top]
    return sorted(set(largest) | {i for i in always if i is not None})


MEASURE_VERBS = {"norms": "draws on", "mixing": "is made of", "rollout": "rolls out to"}


def measure_title(rec: AttentionRecord, measure: str, query_label: str, layer: int | None, head: int | None,
                  words: bool) -> str:
    """The chart's title for any measure; the weights keep :func:`view_title`'s wording."""
    if measure == "weights":
        return view_title(rec, query_label, layer, head, words)
    view = "word view" if words else "token view"
    signed = rec.measure(measure).signed
    sink = ", first token (sink) removed" + ("" if signed else ", renormalised") if rec.sink_removed else ""
    n_l, n_h = len(rec.layers), len(rec.heads)
    if signed:
        info = rec.measure(measure).info
        what = repr(info["target"]) + (f" rather than {info['foil']!r}" if info["foil"] is not None else "")
        where = f"layer {layer}" if layer is not None else "all layers"
        how = "carried back to the input tokens (ALTI-Logit)" if measure == "alti-logit" else "by position read"
        return f"why {what} after {query_label!r} — {rec.model}, logit contributions {how}, {where}, {view}{sink}"
    if measure == "norms":
        how = "norm of the sum over heads" if head is None else f"head {head}"
        where = f"layer {layer}, {how}" if layer is not None else \
            f"head {head}, mean of {n_l} layers" if head is not None else f"mean of {n_l} layers' {how}"
        label = "norms ‖α·W_O v‖ as shares"
    else:
        where = f"layer {layer}" if layer is not None else f"{n_l} layers composed"
        label = "mixing (ALTI), residual and norms included" if measure == "mixing" else \
            f"attention rollout of the mean of {n_h} heads (a baseline)"
    verb = MEASURE_VERBS[measure]
    return f"{query_label!r} {verb} — {rec.model}, {label}, {where}, {view}{sink}"


def heatmap(row_labels: list[str], col_labels: list[str], matrix: torch.Tensor, *, title: str = "") -> str:
    """Rows = queries, columns = keys; shading by value relative to the matrix's largest finite value.

    Non-finite cells are shown as '?'. Column labels are printed vertically-compressed as an index row
    with a legend below, so long tokens never break the grid.
    """
    m = matrix.float()
    finite = m[torch.isfinite(m)]
    top = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0
    rl = [terminal_label(x) for x in row_labels]
    pad = max((len(s) for s in rl), default=0)
    lines = [title] if title else []
    lines.append(" " * (pad + 1) + "".join(f"{j % 10}" for j in range(len(col_labels))))
    for lab, row in zip(rl, m):
        cells = "".join("?" if not torch.isfinite(v) else _SHADES[min(4, int(float(v) / top * 4 + 0.5))]
                        for v in row)
        lines.append(f"{lab.ljust(pad)} {cells}")
    legend = ", ".join(f"{j}={terminal_label(c)}" for j, c in enumerate(col_labels))
    lines.append(f"keys: {legend}")
    lines.append(f"shades: ' ' 0 … '█' {top:.3f}")
    return "\n".join(lines) + "\n"
