"""PNG renderers: the bar chart of one query's attention, a queries x keys heatmap, and a model view.

Pure functions of their inputs that write one file. Matplotlib is used through ``Figure`` and the Agg
canvas only — never ``pyplot`` — so no global figure state outlives a call. Labels are user text (tokens
of any model), so every text object is drawn literally: mathtext and TeX are switched off per object
(``$x$``, ``a_b^c``, ``\\frac`` appear as typed), control characters are escaped, and whitespace-only
tokens are shown as visible symbols. Non-finite weights get their own colour and never set the colour
scale (RELIABILITY V5-V7). Files are written atomically: the PNG is rendered to memory first, then
written beside the target and renamed, so a failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import InputError
from .record import AttentionRecord

INVALID_COLOUR = "#e8298a"  # NaN / Inf cells: a magenta that the blue colour map never produces
_CMAP = "Blues"
_MAX_TICK_LABELS = 60
_THUMB = 48  # model-view thumbnails are max-pooled to at most this many cells per side
_WHITESPACE_SYMBOLS = {" ": "␣", "\t": "⇥", "\n": "↵", "\r": "␍"}
_FALLBACK_FONTS = ("DejaVu Sans", "Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei",
                   "Noto Color Emoji", "Noto Emoji", "Symbola")


# -- public API --------------------------------------------------------------------------------------

def safe_filename(name: str, suffix: str = ".png") -> str:
    """A file name made from untrusted text (a model name, a title): only ``[A-Za-z0-9._-]``, no leading
    dots, at most 120 characters, so ``../../x`` or ``/etc/x`` can never leave the chosen directory. A long
    name keeps its start and its end, where callers put what tells their files apart."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")
    if len(stem) > 120:
        stem = stem[:60] + "_" + stem[-59:]
    return (stem or "qkv") + suffix


def bar_chart_png(labels: Sequence[str], values: Iterable[float], path: str | os.PathLike, *,
                  title: str = "") -> Path:
    """The "how much does X attend to each word" chart: one horizontal bar per key, top to bottom in text
    order, its value printed at the bar's end. ``path`` may be a directory: the name then comes from the
    title. Returns the path written."""
    vals = [float(v) for v in values]
    if len(vals) != len(labels):
        raise InputError(f"bar chart: {len(labels)} labels but {len(vals)} values")
    with _style():
        fig = _bar_figure([visible(s) for s in labels], vals, title)
        return _save(fig, path, title or "attention")


def bar_chart_bytes(labels: Sequence[str], values: Iterable[float], *, title: str = "") -> bytes:
    """:func:`bar_chart_png` into memory: the PNG file's bytes (what `qkv serve` sends for a download)."""
    vals = [float(v) for v in values]
    if len(vals) != len(labels):
        raise InputError(f"bar chart: {len(labels)} labels but {len(vals)} values")
    with _style():
        fig = _bar_figure([visible(s) for s in labels], vals, title)
        return _png(fig)


def heatmap_png(record: AttentionRecord, path: str | os.PathLike, *, layer: int | None = None,
                head: int | None = None, words: bool = True) -> Path:
    """Captured queries (rows) x keys (columns) for one layer/head, or the mean over the captured ones
    (None). Word view follows the record's rule: mean over a query word's pieces, sum over key pieces."""
    if not record.queries:
        raise InputError("the record has no captured query rows to draw; capture with queries=None or a list")
    rows, cols, matrix = _heatmap_data(record, layer, head, words)
    title = _heat_title(record, layer, head, words)
    with _style():
        axes = ("input tokens (keys)", "output tokens (queries)") if record.kind == "cross" else ("keys", "queries")
        fig = _heatmap_figure(rows, cols, matrix, title, axes)
        return _save(fig, path, f"{record.model or 'qkv'}-heatmap")


def model_view_png(record: AttentionRecord, path: str | os.PathLike) -> Path:
    """Every captured layer (rows) x head (columns) as a thumbnail of its queries x keys matrix, each
    scaled to its own largest finite weight so that faint heads still show their pattern."""
    mosaic = _mosaic(record.weights)
    title = f"{record.model or 'attention'}: layers x heads (each thumbnail scaled to its own maximum)"
    if record.sink_removed:
        title += ", first token (sink) removed"
    with _style():
        fig = _model_figure(mosaic, record.layers, record.heads, title)
        return _save(fig, path, f"{record.model or 'qkv'}-model-view")


def visible(s: str) -> str:
    """A token as a label that can be seen: control characters escaped, whitespace-only tokens drawn as
    symbols (``' '`` -> ``␣``), the empty string as ``''``. Other text is left as it is."""
    s = str(s)
    if s == "":
        return "''"
    if s.isspace():
        return "".join(_WHITESPACE_SYMBOLS.get(ch, f"\\u{ord(ch):04x}") for ch in s)
    s = s.replace("\n", "↵").replace("\r", "␍").replace("\t", "⇥")
    return "".join(ch if ch.isprintable() or ch == " " else _escape_char(ch) for ch in s)


# -- data --------------------------------------------------------------------------------------------

def _escape_char(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _heatmap_data(rec: AttentionRecord, layer, head, words) -> tuple[list[str], list[str], torch.Tensor]:
    if not words:
        matrix = torch.stack([rec.row(q, layer, head) for q in rec.queries])
        return [visible(rec.query_tokens[q]) for q in rec.queries], [visible(t) for t in rec.key_tokens], matrix
    spans = rec.query_words or [(i, i + 1) for i in range(len(rec.query_tokens))]
    captured = set(rec.queries)
    chosen = [i for i, (a, b) in enumerate(spans) if any(q in captured for q in range(a, b))]
    q_labels = rec.word_labels("query")
    matrix = torch.stack([rec.word_row(i, layer, head) for i in chosen])
    return [visible(q_labels[i]) for i in chosen], [visible(s) for s in rec.word_labels("key")], matrix


def _heat_title(rec: AttentionRecord, layer, head, words) -> str:
    where = f"layer {layer}" if layer is not None else f"mean of {len(rec.layers)} layers"
    who = f"head {head}" if head is not None else f"mean of {len(rec.heads)} heads"
    parts = [rec.model or "attention", where, who, "word view" if words else "token view"]
    if rec.kind == "cross":
        parts.insert(1, "cross-attention")
    if rec.sink_removed:
        parts.append("first token (sink) removed, renormalised")
    return ", ".join(parts)


def _finite_max(t: torch.Tensor) -> float:
    """Largest finite value, or 1.0 when there is none above 0 (an all-zero map must still draw)."""
    finite = t[torch.isfinite(t)]
    top = float(finite.max()) if finite.numel() else 0.0
    return top if top > 0 else 1.0


def _mosaic(weights: torch.Tensor) -> torch.Tensor:
    """(L, H, Q, K) -> one RGBA-ready grid: each (layer, head) max-pooled to <= _THUMB cells a side and
    divided by its own finite maximum; -1 marks an invalid (NaN/Inf) cell, -2 the gaps between tiles."""
    n_l, n_h, n_q, n_k = weights.shape
    th, tw = min(max(n_q, 1), _THUMB), min(max(n_k, 1), _THUMB)
    out = torch.full((n_l * (th + 1) + 1, n_h * (tw + 1) + 1), -2.0)
    for li in range(n_l):
        for hi in range(n_h):
            tile = _pool_tile(weights[li, hi], th, tw)
            out[1 + li * (th + 1):1 + li * (th + 1) + th, 1 + hi * (tw + 1):1 + hi * (tw + 1) + tw] = tile
    return out


def _pool_tile(m: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """Max-pool one (Q, K) matrix to (th, tw), scaled to [0, 1]; a cell with any invalid weight is -1."""
    if m.numel() == 0:
        return torch.zeros(th, tw)
    invalid = ~torch.isfinite(m)
    vals = torch.where(invalid, torch.zeros_like(m), m).clamp_min(0)
    pooled = torch.nn.functional.adaptive_max_pool2d(vals[None, None], (th, tw))[0, 0]
    bad = torch.nn.functional.adaptive_max_pool2d(invalid.float()[None, None], (th, tw))[0, 0] > 0
    pooled = pooled / _finite_max(pooled)
    return torch.where(bad, torch.full_like(pooled, -1.0), pooled)


# -- figures -----------------------------------------------------------------------------------------

def _style():
    """Literal text, fonts with fallbacks for CJK/emoji when the system has them, and no warnings for
    glyphs that no installed font has (they render as a placeholder box, which is the intent)."""
    import matplotlib
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    fonts = [f for f in _FALLBACK_FONTS if f in names] or ["sans-serif"]
    stack = contextlib.ExitStack()
    stack.enter_context(matplotlib.rc_context({"text.usetex": False, "axes.formatter.use_mathtext": False,
                                               "font.family": fonts, "svg.fonttype": "none"}))
    stack.enter_context(warnings.catch_warnings())  # the filters below end with the stack
    warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
    warnings.filterwarnings("ignore", message=r"Matplotlib currently does not support .* natively")
    return stack


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _literal(fig) -> None:
    """Switch mathtext and TeX off on every text object of the figure (tick labels included)."""
    from matplotlib.text import Text

    for t in fig.findobj(Text):
        t.set_parse_math(False)
        t.set_usetex(False)


def _bar_figure(labels: list[str], vals: list[float], title: str):
    n = len(vals)
    top = _finite_max(torch.tensor(vals, dtype=torch.float64)) if vals else 1.0
    fig = _new_figure(8.0, min(2.0 + 0.32 * max(n, 1), 60.0))
    ax = fig.add_subplot()
    shown = [v if math.isfinite(v) else 0.0 for v in vals]
    colours = ["#2b6cb0" if math.isfinite(v) else INVALID_COLOUR for v in vals]
    ax.barh(range(n), shown, color=colours)
    ax.set_yticks(range(n), labels=labels)
    ax.invert_yaxis()  # text order, top to bottom
    ax.set_xlim(0, top * 1.18)
    for i, v in enumerate(vals):
        txt = f"{v:.3f}" if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        ax.text(max(shown[i], 0.0) + top * 0.01, i, txt, va="center", fontsize=8,
                color="black" if math.isfinite(v) else INVALID_COLOUR)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlabel("attention weight")
    _title(ax, 8.0, title)
    return fig


def _title(ax, width_in: float, title: str) -> None:
    """A left-aligned title wrapped to the figure's width (matplotlib's own wrapping ignores the
    constrained layout and cuts long titles off)."""
    import textwrap

    if title:
        ax.set_title(textwrap.fill(title, max(20, int(width_in * 13))), fontsize=9, loc="left")


def _set_ticks(axis_setter, labels: list[str]) -> None:
    """Label every tick for small maps; for large ones an evenly spaced subset (<= _MAX_TICK_LABELS)."""
    n = len(labels)
    step = max(1, math.ceil(n / _MAX_TICK_LABELS))
    pos = list(range(0, n, step))
    axis_setter(pos, labels=[labels[i] for i in pos])


def _heatmap_figure(rows: list[str], cols: list[str], matrix: torch.Tensor, title: str,
                    axes: tuple[str, str] = ("keys", "queries")):
    import matplotlib
    import numpy as np

    m = matrix.double().numpy()
    bad = ~np.isfinite(m)
    cmap = matplotlib.colormaps[_CMAP].with_extremes(bad=INVALID_COLOUR)
    width = min(4.0 + 0.28 * len(cols), 24.0)
    fig = _new_figure(width, min(2.5 + 0.28 * len(rows), 24.0))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_array(m, mask=bad), cmap=cmap, vmin=0.0, vmax=_finite_max(matrix),
                      aspect="auto", interpolation="nearest")
    _set_ticks(ax.set_yticks, rows)
    _set_ticks(ax.set_xticks, cols)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    _title(ax, width, title + (" — magenta: NaN/Inf" if bad.any() else ""))
    return fig


def _model_figure(mosaic: torch.Tensor, layers: list[int], heads: list[int], title: str):
    import matplotlib
    import numpy as np
    from matplotlib.colors import to_rgba

    m = mosaic.numpy()
    rgba = matplotlib.colormaps[_CMAP](np.clip(m, 0.0, 1.0))
    rgba[m == -1.0] = to_rgba(INVALID_COLOUR)
    rgba[m == -2.0] = to_rgba("white")
    n_l, n_h = len(layers), len(heads)
    width = min(3.0 + 0.9 * n_h, 24.0)
    fig = _new_figure(width, min(1.5 + 0.9 * n_l, 40.0))
    ax = fig.add_subplot()
    ax.imshow(rgba, interpolation="nearest", aspect="auto")
    th, tw = (m.shape[0] - 1) / max(n_l, 1), (m.shape[1] - 1) / max(n_h, 1)
    ax.set_yticks([1 + th * (i + 0.5) - 0.5 for i in range(n_l)], labels=[f"L{x}" for x in layers])
    ax.set_xticks([1 + tw * (i + 0.5) - 0.5 for i in range(n_h)], labels=[f"H{x}" for x in heads])
    ax.tick_params(length=0, labelsize=7)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    _title(ax, width, title)
    return fig


def _save(fig, path: str | os.PathLike, default_name: str) -> Path:
    """Render to memory, then write atomically; a directory as ``path`` gets a sanitised file name."""
    from ..io import write_bytes

    target = Path(path)
    if target.is_dir():
        target = target / safe_filename(default_name)
    return write_bytes(target, _png(fig))


def _png(fig) -> bytes:
    _literal(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- the house style for renderers elsewhere in qkv (lecture views) ---------------------------------------

@contextlib.contextmanager
def styled_figure(width: float, height: float):
    """A new ``width`` x ``height`` inch figure in the house style (literal text, font fallbacks, Agg canvas,
    no pyplot). Draw on it and call :func:`save_figure` inside the ``with`` block."""
    with _style():
        yield _new_figure(width, height)


def save_figure(fig, path: str | os.PathLike, default_name: str) -> Path:
    """Write ``fig`` as a PNG atomically, every text object literal; a directory as ``path`` gets a sanitised
    file name made from ``default_name``. Returns the path written."""
    return _save(fig, path, default_name)


def wrapped_title(ax, width_in: float, title: str) -> None:
    """A left-aligned title wrapped to a figure ``width_in`` inches wide."""
    _title(ax, width_in, title)
