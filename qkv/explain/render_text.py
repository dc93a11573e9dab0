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


def _label(s: str) -> str:
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
              highlight: int | None = None) -> str:
    """One row per key: label, bar scaled to the largest value, the value (3 decimals)."""
    vals = [float(v) for v in values]
    top = max(vals) if vals and max(vals) > 0 else 1.0
    shown = [_label(x) for x in labels]
    pad = max((len(s) for s in shown), default=0)
    lines = [title] if title else []
    for i, (lab, v) in enumerate(zip(shown, vals)):
        mark = "▶" if i == highlight else " "
        lines.append(f"{mark} {lab.ljust(pad)}  {bar(v / top, width).ljust(width)}  {v:.3f}")
    return "\n".join(lines) + "\n"


def heatmap(row_labels: list[str], col_labels: list[str], matrix: torch.Tensor, *, title: str = "") -> str:
    """Rows = queries, columns = keys; shading by value relative to the matrix's largest finite value.

    Non-finite cells are shown as '?'. Column labels are printed vertically-compressed as an index row
    with a legend below, so long tokens never break the grid.
    """
    m = matrix.float()
    finite = m[torch.isfinite(m)]
    top = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0
    rl = [_label(x) for x in row_labels]
    pad = max((len(s) for s in rl), default=0)
    lines = [title] if title else []
    lines.append(" " * (pad + 1) + "".join(f"{j % 10}" for j in range(len(col_labels))))
    for lab, row in zip(rl, m):
        cells = "".join("?" if not torch.isfinite(v) else _SHADES[min(4, int(float(v) / top * 4 + 0.5))]
                        for v in row)
        lines.append(f"{lab.ljust(pad)} {cells}")
    legend = ", ".join(f"{j}={_label(c)}" for j, c in enumerate(col_labels))
    lines.append(f"keys: {legend}")
    lines.append(f"shades: ' ' 0 … '█' {top:.3f}")
    return "\n".join(lines) + "\n"
