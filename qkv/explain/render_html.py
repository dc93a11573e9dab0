"""The interactive attention explorer: one self-contained HTML page made from an ``AttentionRecord``.

Everything the page needs is inside it: the data in a ``<script type="application/json" id="qkv-data">``
island, the CSS and JS inline, a Content-Security-Policy that forbids any other source, no URL at all.
User strings (tokens, model name, title, note) travel only inside that JSON island — escaped for
embedding — and the page's script puts them on screen with ``textContent`` only, so no token can ever
become markup (RELIABILITY V1-V4).

Weights travel as base64 little-endian float32 (exact, compact, fast to decode). Small records embed
every row whole and the page computes means, word sums and the sink renormalisation itself, with the
record's rules. When the full rows would exceed a size budget, each (layer, head, query) row keeps only
its top-k keys plus the first key (so the sink can be removed exactly) and the remaining mass; the means
over layers/heads are then computed here, exactly, for both sink settings, and the page says so.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re

import torch

from .record import AttentionRecord

BUDGET_BYTES = 6_000_000  # raw weight bytes in a page (base64 makes that ~8 MB of text)
TOP_K = 32
MIN_TOP_K = 8
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_JSON_UNSAFE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def explorer_html(record: AttentionRecord, *, title: str = "qkv", query: int | None = None,
                  measure: str | None = None) -> str:
    """The explorer page for ``record``. ``query`` (a captured query position) is selected on opening;
    by default the last captured one, whose row sees the most context in a causal model. ``measure``: which
    of the record's measures the page opens on (default: its first; the page has a selector)."""
    data = _payload(record, title, query, measure)
    heading = ("Output — click a token to see which input tokens it attends to" if record.kind == "cross"
               else "Text — click a token to see what it attends to")
    return _PAGE.format(title=html.escape(str(title), quote=True), csp=CSP, css=_CSS, js=_JS,
                        data=safe_json(data), text_heading=heading)


def safe_json(obj) -> str:
    """JSON that can sit inside a ``<script>`` element: ``<``, ``>``, ``&``, U+2028, U+2029 (and any lone
    surrogate, which UTF-8 cannot carry) become ``\\u`` escapes, so no input can close the element or
    open a comment; ``json.loads`` of the result gives back exactly the same strings."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JSON_UNSAFE.sub(lambda m: _JSON_ESCAPES.get(m.group(), f"\\u{ord(m.group()):04x}"), text)


# -- payload ----------------------------------------------------------------------------------------

def _payload(rec: AttentionRecord, title: str, query: int | None, primary: str | None = None) -> dict:
    n_l, n_h, n_q, n_k = rec.weights.shape
    plan = _plan(n_l, n_h, n_q, n_k)
    rows = _window(rec.queries, plan["queries"], query)
    shown = rec.queries[rows]
    initial = query if query in shown else (shown[-1] if shown else None)
    data = {"version": 1, "title": str(title), "model": rec.model, "kind": rec.kind, "note": rec.note,
            "sink_removed": rec.sink_removed, "sink_available": not rec.sink_removed and n_k >= 2 and rec.kind != "cross",
            "query_tokens": list(rec.query_tokens), "key_tokens": list(rec.key_tokens),
            "queries": list(shown), "captured_queries": n_q, "layers": list(rec.layers),
            "heads": list(rec.heads), "key_roles": list(rec.key_roles), "initial_query": initial,
            **_words(rec), "mode": plan["mode"], "k": plan["k"]}
    w = rec.weights[:, :, rows]
    data["weights"] = _dense(w) if plan["mode"] == "full" else _sparse_all(rec, w, plan["k"])
    data["measures"] = {name: _measure(rec, name, rows, plan) for name in rec.measures}
    data["measure"] = next(iter(rec.measures), "weights") if primary is None else primary
    data["sinks"] = [{"position": s["position"], "token": s["token"], "why": s["why"]} for s in rec.sinks]
    return data


def _measure(rec: AttentionRecord, name: str, rows: slice, plan: dict) -> dict:
    """A measure's views in the sparse row format of the weights (all keys kept when the page has room):
    ``lh`` per (layer, head) when it has heads, ``views`` ordered per layer, per head (mean of layers), model —
    each computed here by the record's own rules (record.values), so the page never re-derives a measure."""
    from .measures import DEFINITIONS

    m = rec.measure(name)
    n_k = len(rec.key_tokens)
    k = n_k - 1 if plan["mode"] == "full" else plan["k"]
    layers = [rec.values(name, layer=layer)[rows] for layer in rec.layers] if m.layers is not None else []
    heads = [rec.values(name, head=head)[rows] for head in rec.heads] if m.heads is not None else []
    views = torch.stack(layers + heads + [rec.values(name)[rows]])  # (L' + H' + 1, Q, K)
    info = {key: v for key, v in m.info.items() if isinstance(v, (str, int, float, type(None)))}
    return {"definition": DEFINITIONS[name], "signed": m.signed, "per_layer": m.layers is not None,
            "per_head": m.heads is not None, "info": info,
            "lh": _sparse(m.heads[:, :, rows], k, _idx_type(n_k)) if m.heads is not None else None,
            "views": _sparse(views, k, _idx_type(n_k), signed=m.signed)}


def _idx_type(n_k: int) -> str:
    return "uint16" if n_k <= 65536 else "uint32"


def _plan(n_l: int, n_h: int, n_q: int, n_k: int) -> dict:
    """Whole rows when they fit the budget; else top-k rows (k from 32 down to 8); else also fewer
    queries, which the page announces."""
    if n_l * n_h * n_q * n_k * 4 <= BUDGET_BYTES:
        return {"mode": "full", "k": None, "queries": n_q}
    per_query_rows = n_l * n_h + 2 * (n_l + n_h + 1)
    idx_bytes = 2 if n_k <= 65536 else 4

    def cost(k: int, q: int) -> int:
        return q * per_query_rows * ((k + 1) * (4 + idx_bytes) + 4)

    k = min(TOP_K, n_k - 1)
    while k > MIN_TOP_K and cost(k, n_q) > BUDGET_BYTES:
        k -= 1
    n_shown = n_q if cost(k, n_q) <= BUDGET_BYTES else max(1, BUDGET_BYTES // cost(k, 1))
    return {"mode": "topk", "k": k, "queries": min(n_q, n_shown)}


def _window(queries: list[int], n: int, query: int | None) -> slice:
    """The captured rows to embed when only ``n`` fit: consecutive ones around ``query`` (default the last
    captured one), so the row the page opens on is always among them."""
    centre = queries.index(query) if query in queries else len(queries) - 1
    start = max(0, min(centre - n // 2, len(queries) - n))
    return slice(start, start + n)


def _words(rec: AttentionRecord) -> dict:
    """Word spans and labels by the record's own rules (labels made here, so the page needs no
    whitespace rules of its own), also for the key side after the sink is dropped."""
    n_q, n_k = len(rec.query_tokens), len(rec.key_tokens)
    out = {"query_words": [list(s) for s in rec.query_words] or [[i, i + 1] for i in range(n_q)],
           "key_words": [list(s) for s in rec.key_words] or [[i, i + 1] for i in range(n_k)],
           "query_word_labels": rec.word_labels("query"), "key_word_labels": rec.word_labels("key")}
    if not rec.sink_removed and n_k >= 2:
        light = AttentionRecord(torch.zeros(0, 0, 0, n_k), rec.query_tokens, rec.key_tokens, [], [], [],
                                key_words=rec.key_words, query_words=rec.query_words).without_sink()
        out["nosink_key_words"] = [[a + 1, b + 1] for a, b in light.key_words] or \
            [[i, i + 1] for i in range(1, n_k)]
        out["nosink_key_word_labels"] = light.word_labels("key")
    return out


def _b64(t: torch.Tensor, dtype) -> str:
    """Little-endian bytes of ``t`` as base64 (x86 and ARM browsers read typed arrays little-endian)."""
    import numpy as np

    return base64.b64encode(t.detach().cpu().numpy().astype(np.dtype(dtype).newbyteorder("<")).tobytes()) \
        .decode("ascii")


def _dense(w: torch.Tensor) -> dict:
    return {"shape": list(w.shape), "w": _b64(w.float(), "float32")}


def _sparse_all(rec: AttentionRecord, w: torch.Tensor, k: int) -> dict:
    """Top-k rows for every (layer, head, query), and exact means over layers/heads for both sink
    settings, as views ordered: per layer (mean of heads), per head (mean of layers), mean of all."""
    idx_type = "uint16" if w.shape[-1] <= 65536 else "uint32"
    off = torch.cat([w.mean(1), w.mean(0), w.mean((0, 1))[None]])  # (L + H + 1, Q, K)
    out = {"idx_type": idx_type, "lh": _sparse(w, k, idx_type), "means_off": _sparse(off, k, idx_type)}
    if not rec.sink_removed and w.shape[-1] >= 2:
        ws = _renormalised_without_sink(w)
        on = torch.cat([ws.mean(1), ws.mean(0), ws.mean((0, 1))[None]])
        out["means_on"] = _sparse(on, k, idx_type)
    return out


def _renormalised_without_sink(w: torch.Tensor) -> torch.Tensor:
    """The record's ``without_sink`` rule, keeping key 0 as a zero column so key indices stay put."""
    rest = w[..., 1:]
    total = rest.sum(-1, keepdim=True)
    rest = torch.where(total > 0, rest / torch.where(total > 0, total, torch.ones_like(total)), rest)
    return torch.cat([torch.zeros_like(w[..., :1]), rest], -1)


def _sparse(w: torch.Tensor, k: int, idx_type: str, signed: bool = False) -> dict:
    """Rows (..., K) -> key 0 plus the k largest other keys (by magnitude when ``signed``), in key order, and
    the mass left over. Invalid (NaN/Inf) weights rank first so the page can show them."""
    rank = w[..., 1:].abs() if signed else w[..., 1:]
    rank = torch.nan_to_num(rank, nan=3.0, posinf=3.0, neginf=3.0)
    top = torch.topk(rank, k, dim=-1).indices + 1 if k > 0 else rank[..., :0].long()
    idx = torch.cat([torch.zeros_like(w[..., :1], dtype=torch.long), top.sort(-1).values], -1)
    vals = torch.gather(w, -1, idx)
    rest = w.sum(-1) - vals.sum(-1)  # float32 is ample: rows sum to 1
    return {"shape": list(idx.shape), "idx": _b64(idx, idx_type), "val": _b64(vals.float(), "float32"),
            "rest": _b64(rest.float(), "float32")}


# -- the page ----------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1 id="title"></h1><p id="meta"></p><p id="notice" class="notice" hidden></p></header>
<section id="controls" aria-label="view">
 <label>measure <select id="measure"></select></label>
 <label>layer <select id="layer"></select></label>
 <label>head <select id="head"></select></label>
 <label><input type="checkbox" id="words"> word view (query: mean over the word's pieces; key: sum)</label>
 <label><input type="checkbox" id="nosink"> drop first token (sink) and renormalise</label>
 <button id="csv">CSV</button> <button id="json">JSON</button> <button id="svg">SVG</button>
</section>
<section aria-label="text"><h2>{text_heading}</h2><div id="tokens"></div></section>
<section aria-label="bars"><h2 id="caption"></h2><p id="definition"></p><p id="sinknote" class="notice" hidden></p>
<div id="bars"></div></section>
<section aria-label="head view"><h2 id="headcap">Head view</h2><div id="headview" class="grid"></div></section>
<section aria-label="model view"><h2 id="modelcap">Model view</h2><div id="modelview"></div></section>
<noscript><p>This page needs JavaScript to draw the attention views.</p></noscript>
<script type="application/json" id="qkv-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

def _web_file(name: str) -> str:
    """The explorer's CSS and JavaScript live as files in qkv/explain/web/, shared with the served page."""
    from importlib.resources import files

    return files("qkv.explain").joinpath("web", name).read_text(encoding="utf-8")


_CSS = _web_file("explorer.css")
_JS = _web_file("common.js") + "\n" + _web_file("explorer.js")  # one inline script: one CSP hash


def _csp(script: str) -> str:
    """Nothing may load; the one script runs because its hash is named, which also blocks inline event
    handlers — a second line of defence should a token ever become markup ('unsafe-inline' would not)."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
            "base-uri 'none'; form-action 'none'")


CSP = _csp(_JS)
