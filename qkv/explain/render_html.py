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


def explorer_html(record: AttentionRecord, *, title: str = "qkv", query: int | None = None) -> str:
    """The explorer page for ``record``. ``query`` (a captured query position) is selected on opening;
    by default the last captured one, whose row sees the most context in a causal model."""
    data = _payload(record, title, query)
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

def _payload(rec: AttentionRecord, title: str, query: int | None) -> dict:
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
    return data


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


def _sparse(w: torch.Tensor, k: int, idx_type: str) -> dict:
    """Rows (..., K) -> key 0 plus the k largest other keys, in key order, and the mass left over.
    Invalid (NaN/Inf) weights rank first so the page can show them."""
    rank = torch.nan_to_num(w[..., 1:], nan=3.0, posinf=3.0, neginf=3.0)
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
 <label>layer <select id="layer"></select></label>
 <label>head <select id="head"></select></label>
 <label><input type="checkbox" id="words"> word view (query: mean over the word's pieces; key: sum)</label>
 <label><input type="checkbox" id="nosink"> drop first token (sink) and renormalise</label>
</section>
<section aria-label="text"><h2>{text_heading}</h2><div id="tokens"></div></section>
<section aria-label="bars"><h2 id="caption"></h2><div id="bars"></div></section>
<section aria-label="head view"><h2 id="headcap">Head view</h2><div id="headview" class="grid"></div></section>
<section aria-label="model view"><h2 id="modelcap">Model view</h2><div id="modelview"></div></section>
<noscript><p>This page needs JavaScript to draw the attention views.</p></noscript>
<script type="application/json" id="qkv-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1rem 1.5rem;color:#1a202c;background:#fff}
h1{font-size:1.3rem;margin:.2rem 0}h2{font-size:1rem;margin:1.2rem 0 .4rem}
#meta{color:#4a5568;margin:.2rem 0}.notice{background:#fffbea;border:1px solid #f6e05e;padding:.4rem .6rem}
#controls{display:flex;flex-wrap:wrap;gap:.6rem 1.4rem;align-items:center;margin:.6rem 0;
 position:sticky;top:0;background:#fff;padding:.4rem 0;z-index:2;border-bottom:1px solid #e2e8f0}
#tokens{line-height:2.1;max-height:16rem;overflow:auto}
.tok{display:inline-block;white-space:pre;border:1px solid #e2e8f0;border-radius:3px;padding:0 .25rem;
 margin:0 .12rem;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;color:#a0aec0}
.tok.q{color:#1a202c;border-color:#90cdf4;cursor:pointer;background:#ebf8ff}
.tok.q:hover{background:#bee3f8}.tok.q.sel{background:#2b6cb0;color:#fff;border-color:#2b6cb0}
#bars{max-height:32rem;overflow:auto;max-width:60rem}
.bar{display:grid;grid-template-columns:minmax(6rem,14rem) 1fr 5.5rem;align-items:center;gap:.5rem;
 font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
.bar .label{white-space:pre;overflow:hidden;text-overflow:ellipsis;text-align:right}
.bar .track{background:#edf2f7;height:.9rem;border-radius:2px}
.bar .fill{display:block;background:#3182ce;height:100%;border-radius:2px}
.bar.self .label{font-weight:700}.bar.rest .fill{background:#a0aec0}.bar.bad .fill{background:#e8298a}
.bar.bad .num{color:#e8298a}
.grid{display:flex;flex-wrap:wrap;gap:.8rem}
figure{margin:0;text-align:center;font-size:12px;cursor:pointer}figure.sel canvas{outline:3px solid #dd6b20}
canvas{image-rendering:pixelated;border:1px solid #cbd5e0;display:block}
.mat{position:relative;display:inline-block}
.mark{position:absolute;left:-5px;right:-5px;border:2px solid #dd6b20;box-sizing:border-box;pointer-events:none}
#modelview table{border-collapse:collapse}#modelview td,#modelview th{padding:2px;font-size:11px}
#modelview td{cursor:pointer}#modelview td.sel canvas{outline:2px solid #dd6b20}
"""

_JS = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("qkv-data").textContent);
  const $ = (id) => document.getElementById(id);
  const L = D.layers.length, H = D.heads.length, QS = D.queries.length, K = D.key_tokens.length;
  const ST = {layer: -1, head: -1, words: false, nosink: false, q: null};
  const W = decodeWeights();

  function b64(s, Type) {
    const bin = atob(s), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    return new Type(u.buffer);
  }
  function decodeWeights() {
    const w = D.weights;
    if (D.mode === "full") return {w: b64(w.w, Float32Array)};
    const I = w.idx_type === "uint32" ? Uint32Array : Uint16Array;
    const dec = (p) => p && {idx: b64(p.idx, I), val: b64(p.val, Float32Array), rest: b64(p.rest, Float32Array),
                             n: p.shape[p.shape.length - 1]};
    return {lh: dec(w.lh), off: dec(w.means_off), on: dec(w.means_on)};
  }

  // Text that can be seen: control characters escaped, white-space-only and empty tokens as symbols.
  function visible(s) {
    if (s === "") return "''";
    const sym = {" ": "\u2423", "\t": "\u21e5", "\n": "\u21b5", "\r": "\u240d"};
    if (/^\s+$/.test(s)) {
      return Array.from(s).map((c) => sym[c] || "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")).join("");
    }
    return s.replace(/[\n\r\t]/g, (c) => sym[c])
            .replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g,
                     (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // -- rows: {vals: Float64Array(K), known: Uint8Array|null (null = every key known), rest} ----------
  function renorm(row) {  // the record's without_sink rule: drop key 0, divide by the rest's sum if > 0
    let total = row.rest;
    for (let j = 1; j < K; j++) if (!row.known || row.known[j]) total += row.vals[j];
    row.vals[0] = 0;
    if (row.known) row.known[0] = 0;
    if (total > 0) { for (let j = 1; j < K; j++) row.vals[j] /= total; row.rest /= total; }
    return row;
  }
  function sparseRow(p, r) {
    const vals = new Float64Array(K), known = new Uint8Array(K), o = r * p.n;
    for (let e = 0; e < p.n; e++) { vals[p.idx[o + e]] = p.val[o + e]; known[p.idx[o + e]] = 1; }
    return {vals: vals, known: known, rest: p.rest[r]};
  }
  function lhRow(li, hi, qi, sink) {  // one (layer, head) row of captured query qi
    const r = (li * H + hi) * QS + qi;
    const row = D.mode === "full" ? {vals: Float64Array.from(W.w.subarray(r * K, r * K + K)), known: null, rest: 0}
                                  : sparseRow(W.lh, r);
    return sink ? renorm(row) : row;
  }
  function meanRows(rows) {
    const out = {vals: new Float64Array(K), known: rows[0].known ? new Uint8Array(K) : null, rest: 0};
    for (const row of rows) {
      for (let j = 0; j < K; j++) out.vals[j] += row.vals[j] / rows.length;
      if (out.known) for (let j = 0; j < K; j++) out.known[j] |= row.known[j];
      out.rest += row.rest / rows.length;
    }
    return out;
  }
  // Layer/head selection (-1 = mean over the captured ones), like AttentionRecord.row.
  function selRow(li, hi, qi, sink) {
    if (li >= 0 && hi >= 0) return lhRow(li, hi, qi, sink);
    if (D.mode === "full") {
      const rows = [];
      for (let l = 0; l < L; l++) if (li < 0 || l === li)
        for (let h = 0; h < H; h++) if (hi < 0 || h === hi) rows.push(lhRow(l, h, qi, sink));
      return meanRows(rows);
    }
    const view = hi < 0 && li >= 0 ? li : (li < 0 && hi >= 0 ? L + hi : L + H);
    return sparseRow(sink ? W.on : W.off, view * QS + qi);
  }
  function keyWords(sink) {
    return sink ? {spans: D.nosink_key_words, labels: D.nosink_key_word_labels}
                : {spans: D.key_words, labels: D.key_word_labels};
  }
  function wordSums(row, sink) {  // sum over each key word's pieces (known pieces only in top-k mode)
    const kw = keyWords(sink), vals = [], known = [];
    kw.spans.forEach(([a, b]) => {
      let s = 0, k = !row.known;
      for (let j = a; j < b; j++) if (!row.known || row.known[j]) { s += row.vals[j]; k = true; }
      vals.push(s); known.push(k);
    });
    return {vals: vals, known: known, rest: row.rest, labels: kw.labels};
  }
  function pieces(word) {  // captured query indices (into D.queries) of a query word
    const [a, b] = D.query_words[word], out = [];
    D.queries.forEach((q, qi) => { if (q >= a && q < b) out.push(qi); });
    return out;
  }
  // The selected query's row for a layer/head selection, in the current token/word view.
  function currentRow(li, hi) {
    const sink = ST.nosink && D.sink_available;
    if (!ST.words) {
      const row = selRow(li, hi, ST.q, sink);
      const idx = [], vals = [];
      for (let j = sink ? 1 : 0; j < K; j++) {
        if (!row.known || row.known[j]) { idx.push(j); vals.push(row.vals[j]); }
      }
      return {idx: idx, vals: vals, rest: row.rest, labels: D.key_tokens, sparse: !!row.known};
    }
    const row = wordSums(meanRows(pieces(ST.q).map((qi) => selRow(li, hi, qi, sink))), sink);
    const idx = [], vals = [];
    row.vals.forEach((v, i) => { if (row.known[i]) { idx.push(i); vals.push(v); } });
    return {idx: idx, vals: vals, rest: row.rest, labels: row.labels, sparse: D.mode !== "full"};
  }

  // -- drawing ---------------------------------------------------------------------------------------
  function fmt(v) { return Number.isFinite(v) ? v.toFixed(4) : String(v); }
  function renderBars() {
    const box = $("bars");
    box.replaceChildren();
    if (ST.q === null) { box.appendChild(el("p", "", "No captured query to show.")); return; }
    const row = currentRow(ST.layer, ST.head);
    let top = 0;
    row.vals.forEach((v) => { if (Number.isFinite(v) && v > top) top = v; });
    const selfKey = selfIndex();
    row.idx.forEach((i, n) => box.appendChild(barEl(row.labels[i], row.vals[n], top, i, i === selfKey)));
    if (row.sparse) {
      const b = barEl("other keys (not embedded)", row.rest, top, null, false);
      b.classList.add("rest");
      box.appendChild(b);
    }
    $("caption").textContent = captionText();
  }
  function barEl(label, v, top, key, self) {
    const b = el("div", "bar"), fill = el("span", "fill"), track = el("span", "track");
    if (key !== null) { b.dataset.key = String(key); b.dataset.value = String(v); }
    else b.dataset.rest = String(v);
    if (self) b.classList.add("self");
    if (!Number.isFinite(v)) b.classList.add("bad");
    const lab = el("span", "label", visible(label));
    lab.title = label;
    if (key !== null && !ST.words && D.key_roles.length) lab.title = label + " [" + D.key_roles[key] + "]";
    fill.style.width = (Number.isFinite(v) && top > 0 ? Math.min(1, Math.max(0, v) / top) * 100 : 0) + "%";
    track.appendChild(fill);
    b.append(lab, track, el("span", "num", fmt(v)));
    return b;
  }
  function selfIndex() {  // the key (token or word) that is the query itself, for self-attention
    if (D.kind === "cross") return -1;
    const pos = ST.words ? D.query_words[ST.q][0] : D.queries[ST.q];
    if (!ST.words) return pos;
    const kw = keyWords(ST.nosink && D.sink_available).spans;
    return kw.findIndex(([a, b]) => pos >= a && pos < b);
  }
  function queryLabel() {
    return ST.words ? D.query_word_labels[ST.q] : D.query_tokens[D.queries[ST.q]];
  }
  function selName(i, names, what) {
    if (i < 0 && names.length === 1) return what + " " + names[0];
    return i < 0 ? "mean of " + names.length + " " + what + "s" : what + " " + names[i];
  }
  function captionText() {
    const parts = [selName(ST.layer, D.layers, "layer"), selName(ST.head, D.heads, "head"),
                   ST.words ? "word view" : "token view"];
    if (ST.nosink && D.sink_available) parts.push("first token (sink) removed, renormalised");
    if (D.sink_removed) parts.push("first token (sink) was removed before capture");
    return "\u201c" + visible(queryLabel()) + "\u201d attends to \u2014 " + parts.join(", ");
  }

  function colour(t) {  // white -> blue for t in [0, 1]; magenta for invalid
    if (!Number.isFinite(t)) return [232, 41, 138];
    const c = Math.max(0, Math.min(1, t));
    return [Math.round(247 - 204 * c), Math.round(251 - 150 * c), Math.round(255 - 115 * c)];
  }
  function paint(canvas, cells, rows, cols, scale) {
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
    for (let i = 0; i < rows * cols; i++) {
      const [r, g, b] = colour(cells[i] / scale);
      img.data.set([r, g, b, 255], i * 4);
    }
    ctx.putImageData(img, 0, 0);
  }
  function maxFinite(a) {  // the colour scale: largest finite value (1 if none is above 0)
    let m = 0;
    for (const v of a) if (Number.isFinite(v) && v > m) m = v;
    return m > 0 ? m : 1;
  }
  function pool(cells, bin, v) {  // max-pooling in which an invalid (NaN/Inf) weight always shows
    if (Number.isNaN(cells[bin])) return;
    cells[bin] = Number.isFinite(v) ? Math.max(cells[bin], v) : NaN;
  }

  // Head view: per head of the chosen layer, the captured queries x keys matrix (max-pooled to fit).
  function renderHeadView() {
    const box = $("headview"), sink = ST.nosink && D.sink_available, li = ST.layer;
    box.replaceChildren();
    const rows = Math.min(QS, 160), cols = Math.min(K, 240);
    for (let h = 0; h < H; h++) {
      const cells = new Float64Array(rows * cols);
      for (let qi = 0; qi < QS; qi++) {
        const row = selRow(li, h, qi, sink), r = Math.floor(qi * rows / QS);
        for (let j = 0; j < K; j++) {
          if (!row.known || row.known[j]) pool(cells, r * cols + Math.floor(j * cols / K), row.vals[j]);
        }
      }
      const fig = el("figure"), cv = document.createElement("canvas");
      cv.width = cols; cv.height = rows;
      cv.style.width = Math.max(160, Math.min(320, cols * 16)) + "px";
      cv.style.height = Math.max(80, Math.min(240, rows * 16)) + "px";
      paint(cv, cells, rows, cols, maxFinite(cells));
      const mat = el("div", "mat");
      mat.append(cv, ...markRows(rows));
      fig.append(mat, el("figcaption", "", "head " + D.heads[h]));
      if (h === ST.head) fig.classList.add("sel");
      fig.addEventListener("click", () => { setSelect("head", h); });
      box.appendChild(fig);
    }
    $("headcap").textContent = "Head view \u2014 " + selName(li, D.layers, "layer") +
      ": each head's captured queries (rows) \u00d7 keys (columns), token level, the selected query framed;" +
      " click a head to select it";
  }
  function markRows(rows) {  // a frame around the selected query's row(s), drawn over the canvas
    if (ST.q === null) return [];
    const qis = ST.words ? pieces(ST.q) : [ST.q], m = el("div", "mark");
    const r0 = Math.floor(Math.min(...qis) * rows / QS), r1 = Math.floor(Math.max(...qis) * rows / QS) + 1;
    m.style.top = (r0 / rows * 100) + "%";
    m.style.height = ((r1 - r0) / rows * 100) + "%";
    return [m];
  }

  // Model view: layers x heads, each a strip of the selected query's row over keys (pooled to fit).
  function renderModelView() {
    const box = $("modelview");
    box.replaceChildren();
    if (ST.q === null) return;
    const table = el("table"), head = el("tr");
    head.appendChild(el("th"));
    D.heads.forEach((h) => head.appendChild(el("th", "", "H" + h)));
    table.appendChild(head);
    for (let l = 0; l < L; l++) {
      const tr = el("tr");
      tr.appendChild(el("th", "", "L" + D.layers[l]));
      for (let h = 0; h < H; h++) tr.appendChild(thumb(l, h));
      table.appendChild(tr);
    }
    box.appendChild(table);
    $("modelcap").textContent = "Model view \u2014 \u201c" + visible(queryLabel()) + "\u201d in every layer " +
      "\u00d7 head (darker = more attention, each scaled to its own maximum); click to select";
  }
  function thumb(l, h) {
    const row = currentRow(l, h), n = Math.max(1, row.labels.length), cols = Math.min(n, 96);
    const cells = new Float64Array(cols);
    row.idx.forEach((i, m) => pool(cells, Math.floor(i * cols / n), row.vals[m]));
    const td = el("td"), cv = document.createElement("canvas");
    cv.width = cols; cv.height = 1;
    cv.style.width = "96px"; cv.style.height = "14px";
    paint(cv, cells, 1, cols, maxFinite(cells));
    td.title = "layer " + D.layers[l] + ", head " + D.heads[h];
    if (l === ST.layer && h === ST.head) td.classList.add("sel");
    td.appendChild(cv);
    td.addEventListener("click", () => { $("layer").value = String(l); setSelect("head", h); });
    return td;
  }

  // -- text, controls --------------------------------------------------------------------------------
  function renderTokens() {
    const box = $("tokens");
    box.replaceChildren();
    const captured = new Map(D.queries.map((q, qi) => [q, qi]));
    if (!ST.words) {
      D.query_tokens.forEach((t, pos) => {
        const s = el("span", "tok", visible(t));
        if (captured.has(pos)) {
          const qi = captured.get(pos);
          s.classList.add("q"); s.dataset.q = String(pos);
          if (qi === ST.q) s.classList.add("sel");
          s.addEventListener("click", () => select(qi));
        }
        box.appendChild(s);
      });
      return;
    }
    D.query_word_labels.forEach((w, wi) => {
      const s = el("span", "tok", visible(w));
      if (pieces(wi).length) {
        s.classList.add("q"); s.dataset.word = String(wi);
        if (wi === ST.q) s.classList.add("sel");
        s.addEventListener("click", () => select(wi));
      }
      box.appendChild(s);
    });
  }
  function select(q) { ST.q = q; renderAll(); }
  function setSelect(id, v) { $(id).value = String(v); readControls(); }
  function renderAll() { renderTokens(); renderBars(); renderHeadView(); renderModelView(); }
  function readControls() {
    const words = $("words").checked;
    if (words !== ST.words && ST.q !== null) ST.q = words ? wordOf(D.queries[ST.q]) : pieces(ST.q)[0];
    ST.words = words;
    ST.layer = Number($("layer").value); ST.head = Number($("head").value);
    ST.nosink = $("nosink").checked;
    renderAll();
  }
  function wordOf(pos) { return D.query_words.findIndex(([a, b]) => pos >= a && pos < b); }
  function fillSelect(id, names, what) {
    const s = $(id);
    s.appendChild(new Option("all (mean)", "-1"));
    names.forEach((n, i) => s.appendChild(new Option(what + " " + n, String(i))));
    s.addEventListener("change", readControls);
  }
  function init() {
    $("title").textContent = D.title;
    document.title = D.title;
    const meta = [D.model && "model: " + D.model, "attention: " + D.kind, D.note];
    $("meta").textContent = meta.filter(Boolean).join(" \u00b7 ");
    const notes = [];
    if (D.mode === "topk") notes.push("Long input: each layer/head/query row embeds only its " + D.k +
      " largest weights plus the first token; \u201cother keys\u201d is the rest of the row's mass. " +
      "Means over layers/heads are exact; word sums cover the embedded pieces only.");
    if (QS < D.captured_queries) notes.push("Only " + QS + " of the " + D.captured_queries +
      " captured query rows are embedded (positions " + D.queries[0] + "\u2013" + D.queries[QS - 1] + ").");
    if (notes.length) { $("notice").textContent = notes.join(" "); $("notice").hidden = false; }
    fillSelect("layer", D.layers, "layer"); fillSelect("head", D.heads, "head");
    $("words").addEventListener("change", readControls);
    $("nosink").addEventListener("change", readControls);
    $("nosink").disabled = !D.sink_available;
    const qi = D.queries.indexOf(D.initial_query);
    ST.q = qi >= 0 && L > 0 && H > 0 ? qi : null;
    renderAll();
  }
  init();
})();
"""


def _csp(script: str) -> str:
    """Nothing may load; the one script runs because its hash is named, which also blocks inline event
    handlers — a second line of defence should a token ever become markup ('unsafe-inline' would not)."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
            "base-uri 'none'; form-action 'none'")


CSP = _csp(_JS)
