"""Renderers of a by-hand trace: terminal (rich), Markdown and a self-contained HTML page.

They all show the exercise's **column layout**: tokens are columns, Q = WQ·X, the score matrix is
KᵀQ (row j = key j, column i = query i), softmax runs down each column (columns sum to 1), Z = V·A.
Each is a pure function of the trace.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

from .byhand import HeadTrace, Trace

LAYOUT_NOTE = ("Column layout, as in the exercise: tokens are columns, A = softmax of each column of KᵀQ. "
               "Code uses the row layout — the same numbers transposed: weights = softmax(Q Kᵀ) by rows.")


@dataclass
class Grid:
    """One labelled matrix to show."""

    caption: str
    values: np.ndarray
    rows: list[str]
    cols: list[str]


@dataclass
class Block:
    """A step of the exercise: a title and one or more matrices side by side (e.g. exact | approx)."""

    title: str
    grids: list[Grid]


def fmt(v: float) -> str:
    """Integers without decimals; anything else with 3 decimals ("-0" is shown as "0")."""
    if math.isfinite(v) and abs(v - round(v)) < 1e-9 and abs(v) < 1e12:
        return str(int(round(v)))
    return f"{v:.3f}"


def blocks(trace: Trace, modes: tuple[str, ...]) -> list[Block]:
    """The steps of every head, then the multi-head output."""
    toks = list(trace.example.tokens)
    x = trace.example.X
    out = [Block("Input X (one column per token)", [Grid("X", x.T, [f"f{i + 1}" for i in range(x.shape[1])], toks)])]
    for n, h in enumerate(trace.heads):
        out += _head_blocks(h, n, len(trace.heads), toks, modes, x.shape[1])
    if len(trace.heads) > 1:
        grids = [Grid(f"Z ({m})", trace.output(m).T, _zrows(trace), toks) for m in modes]
        out.append(Block(f"Multi-head output: the {len(trace.heads)} heads' Z stacked "
                         f"({x.shape[1]} -> {trace.output(modes[0]).shape[1]})", grids))
    return out


def _zrows(trace: Trace) -> list[str]:
    return [f"h{n + 1}.z{i + 1}" for n, h in enumerate(trace.heads) for i in range(h.V.shape[1])]


def _head_blocks(h: HeadTrace, n: int, total: int, toks: list[str], modes, d_model: int) -> list[Block]:
    tag = f"head {n + 1}: " if total > 1 else ""
    feats = [f"f{i + 1}" for i in range(d_model)]
    qs, ks = [f"q·{t}" for t in toks], [f"k·{t}" for t in toks]
    dk = [str(i + 1) for i in range(h.d_k)]
    dv = [str(i + 1) for i in range(h.V.shape[1])]
    div = h.divisor
    scale_cap = {"exact": f"exact: / √{h.d_k} = / {math.sqrt(h.d_k):.3f}", "approx": f"approx: ⌊x / {div}⌋"}
    exp_cap = {"exact": "exact: e^x", "approx": "approx: 3^x"}
    sub = lambda m: getattr(h, m)  # noqa: E731 — exact or approximate steps
    return [
        Block(f"{tag}weights WQ, WK, WV ({d_model} -> {h.d_k})",
              [Grid(name, mat, dv if name == "WV" else dk, feats) for name, mat in h.W.items()]),
        Block(f"{tag}Q = WQ·X, K = WK·X, V = WV·X", [
            Grid("Q", h.Q.T, dk, toks), Grid("K", h.K.T, dk, toks), Grid("V", h.V.T, dv, toks)]),
        Block(f"{tag}scores KᵀQ (row = key, column = query)", [Grid("KᵀQ", h.scores.T, ks, qs)]),
        Block(f"{tag}scale", [Grid(scale_cap[m], sub(m).scaled.T, ks, qs) for m in modes]),
        Block(f"{tag}exponentiate", [Grid(exp_cap[m], sub(m).exp.T, ks, qs) for m in modes]),
        Block(f"{tag}column sums", [Grid(m, sub(m).sums[None, :], ["Σ"], qs) for m in modes]),
        Block(f"{tag}A = each column / its sum (columns sum to 1)",
              [Grid(f"A ({m})", sub(m).weights.T, ks, qs) for m in modes]),
        Block(f"{tag}Z = V·A (column i = output of token i)",
              [Grid(f"Z ({m})", sub(m).Z.T, dv, toks) for m in modes]),
    ]


# --- terminal ---------------------------------------------------------------------------------------

def render_text(trace: Trace, modes: tuple[str, ...], console=None) -> None:
    """Print every step with rich tables; exact and approx side by side."""
    from rich import box
    from rich.columns import Columns
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]Self-attention by hand[/bold] — {len(trace.example.tokens)} tokens, "
                  f"{len(trace.heads)} head(s)")
    console.print(LAYOUT_NOTE, style="dim")
    for b in blocks(trace, modes):
        console.print()
        console.print(f"[bold cyan]{_esc(b.title)}[/bold cyan]")
        tables = []
        for g in b.grids:
            t = Table(title=_esc(g.caption), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
            t.add_column("", style="dim")
            for c in g.cols:
                t.add_column(_esc(c), justify="right")
            for r, row in zip(g.rows, g.values):
                t.add_row(_esc(r), *(fmt(v) for v in row))
            tables.append(t)
        console.print(Columns(tables, padding=(0, 3)))


def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# --- markdown ---------------------------------------------------------------------------------------

def render_markdown(trace: Trace, modes: tuple[str, ...]) -> str:
    lines = ["# Self-attention by hand", "", LAYOUT_NOTE]
    for b in blocks(trace, modes):
        lines += ["", f"## {b.title}"]
        for g in b.grids:
            lines += ["", f"**{_md(g.caption)}**", "", "| | " + " | ".join(_md(c) for c in g.cols) + " |",
                      "|---|" + "---:|" * len(g.cols)]
            lines += [f"| {_md(r)} | " + " | ".join(fmt(v) for v in row) + " |" for r, row in zip(g.rows, g.values)]
    return "\n".join(lines) + "\n"


def _md(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


# --- html -------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2rem;color:#222}h2{font-size:1.05rem;margin-top:1.6rem}
.row{display:flex;gap:2rem;flex-wrap:wrap}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:.2rem 0}td,th{border:1px solid #ccc;padding:.15rem .5rem;
text-align:right}th{background:#f4f4f4}.note{color:#666}"""


def render_html(trace: Trace, modes: tuple[str, ...]) -> str:
    """One self-contained page (inline CSS, no script, no remote resource); every string escaped."""
    e = lambda s: html.escape(s, quote=True)  # noqa: E731
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">",
             f"<title>Self-attention by hand</title><style>{_CSS}</style></head><body>",
             "<h1>Self-attention by hand</h1>", f"<p class='note'>{e(LAYOUT_NOTE)}</p>"]
    for b in blocks(trace, modes):
        parts.append(f"<h2>{e(b.title)}</h2><div class='row'>")
        for g in b.grids:
            head = "".join(f"<th>{e(c)}</th>" for c in g.cols)
            body = "".join(f"<tr><th>{e(r)}</th>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
                           for r, row in zip(g.rows, g.values))
            parts.append(f"<table><caption>{e(g.caption)}</caption><tr><th></th>{head}</tr>{body}</table>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
