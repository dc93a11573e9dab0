"use strict";
(function () {
  const D = JSON.parse(document.getElementById("qkv-data").textContent);
  const $ = (id) => document.getElementById(id);
  const L = D.layers.length, H = D.heads.length, QS = D.queries.length, K = D.key_tokens.length;
  const ST = {layer: -1, head: -1, words: false, nosink: false, q: null, measure: "weights"};
  const W = decodeWeights();
  const MS = decodeMeasures();

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
  function decodeMeasures() {  // each measure: its views (per layer, per head, model) and per-(layer, head) rows
    const out = {};
    for (const [name, m] of Object.entries(D.measures)) {
      const I = D.key_tokens.length > 65536 ? Uint32Array : Uint16Array;  // as _idx_type
      const dec = (p) => p && {idx: b64(p.idx, I),
                               val: b64(p.val, Float32Array), rest: b64(p.rest, Float32Array),
                               n: p.shape[p.shape.length - 1], rows: p.shape[p.shape.length - 2]};
      out[name] = {lh: dec(m.lh), views: dec(m.views), signed: m.signed, perLayer: m.per_layer,
                   perHead: m.per_head, info: m.info, definition: m.definition};
    }
    return out;
  }

  const el = QKV.el, visible = QKV.visible, fmt = QKV.fmt;

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
    return {vals: vals, known: p.n >= K ? null : known, rest: p.rest[r]};
  }
  // A measure's row (null where it has none: a prediction measure explains one position only).
  function measureRow(m, li, hi, qi, sink) {
    const rows = m.views.rows, r = rows === QS ? qi : (D.queries[qi] === m.info.position ? 0 : -1);
    if (r < 0) return null;
    const nL = m.perLayer ? L : 0, nH = m.perHead ? H : 0;
    let row;
    if (li >= 0 && hi >= 0 && m.lh) row = sparseRow(m.lh, (li * H + hi) * rows + r);
    else {
      const view = li >= 0 && m.perLayer ? li : (hi >= 0 && m.perHead ? nL + hi : nL + nH);
      row = sparseRow(m.views, view * rows + r);
    }
    if (!sink) return row;
    if (!m.signed) return renorm(row);
    row.vals[0] = 0; if (row.known) row.known[0] = 0;
    return row;
  }
  function hasHeads() { return ST.measure === "weights" || MS[ST.measure].perHead; }
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
    if (ST.measure !== "weights") return measureRow(MS[ST.measure], li, hi, qi, sink);
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
      if (!row) return null;
      const idx = [], vals = [];
      for (let j = sink ? 1 : 0; j < K; j++) {
        if (!row.known || row.known[j]) { idx.push(j); vals.push(row.vals[j]); }
      }
      return {idx: idx, vals: vals, rest: row.rest, labels: D.key_tokens, sparse: !!row.known};
    }
    const rows = pieces(ST.q).map((qi) => selRow(li, hi, qi, sink)).filter((r) => r);
    if (!rows.length) return null;
    const row = wordSums(meanRows(rows), sink);
    const idx = [], vals = [];
    row.vals.forEach((v, i) => { if (row.known[i]) { idx.push(i); vals.push(v); } });
    return {idx: idx, vals: vals, rest: row.rest, labels: row.labels, sparse: D.mode !== "full"};
  }

  // -- drawing ---------------------------------------------------------------------------------------
  function renderBars() {
    const box = $("bars");
    box.replaceChildren();
    if (ST.q === null) { box.appendChild(el("p", "", "No captured query to show.")); return; }
    $("caption").textContent = captionText();
    $("definition").textContent = ST.measure === "weights" ? "softmax attention weights (each row sums to 1)"
                                                           : MS[ST.measure].definition + extraText();
    const row = currentRow(ST.layer, ST.head);
    if (!row) {
      box.appendChild(el("p", "", "The " + ST.measure + " measure explains the prediction made at position " +
                         MS[ST.measure].info.position + " only: select that token."));
      return;
    }
    let top = 0;
    row.vals.forEach((v) => { if (Number.isFinite(v) && Math.abs(v) > top) top = Math.abs(v); });
    const selfKey = selfIndex(), sinks = sinkKeys();
    row.idx.forEach((i, n) => {
      const b = barEl(row.labels[i], row.vals[n], top, i, i === selfKey);
      if (sinks.has(i)) { b.classList.add("sink"); b.querySelector(".label").textContent += " \u25c0 sink"; }
      box.appendChild(b);
    });
    if (row.sparse) {
      const b = barEl("other keys (not embedded)", row.rest, top, null, false);
      b.classList.add("rest");
      box.appendChild(b);
    }
    $("caption").textContent = captionText();
  }
  function barEl(label, v, top, key, self) {
    const b = QKV.barEl(label, v, top, {key: key, self: self});
    if (key !== null && !ST.words && D.key_roles.length) b.querySelector(".label").title = label + " [" + D.key_roles[key] + "]";
    return b;
  }
  function shownBars() {  // the bars on screen as labels and values (the exports' numbers)
    const labels = [], values = [];
    $("bars").querySelectorAll(".bar").forEach((b) => {
      labels.push(b.dataset.label);
      values.push(Number(b.dataset.key !== undefined ? b.dataset.value : b.dataset.rest));
    });
    return {labels: labels, values: values};
  }
  function sinkKeys() {  // bar indices (tokens or words) that hold a detected attention sink
    const sink = ST.nosink && D.sink_available, out = new Set();
    for (const s of D.sinks) {
      if (sink && s.position === 0) continue;
      if (!ST.words) { out.add(s.position); continue; }
      out.add(keyWords(sink).spans.findIndex(([a, b]) => s.position >= a && s.position < b));
    }
    return out;
  }
  function extraText() {
    const i = MS[ST.measure].info;
    if (!MS[ST.measure].signed) return "";
    return ". Target " + JSON.stringify(i.target) + (i.foil !== null ? " vs foil " + JSON.stringify(i.foil) : "") +
      ": logit difference " + i.logit_difference.toFixed(3) + ", of which the MLPs and biases (remainder) " +
      i.remainder.toFixed(3);
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
  function measureSel() {  // how the layer/head selection reads for the current measure
    const lay = selName(ST.layer, D.layers, "layer"), head = selName(ST.head, D.heads, "head");
    if (ST.measure === "weights") return [lay, head];
    if (ST.measure === "norms") return [ST.layer < 0 ? "mean of " + L + " layers" : lay,
                                        ST.head < 0 ? "norm of the sum over heads" : head];
    if (MS[ST.measure].signed) return [ST.layer < 0 ? "sum over " + L + " layers" : lay, "all heads together"];
    return [ST.layer < 0 ? L + " layers composed" : lay, "all heads together"];
  }
  function captionText() {
    const parts = [ST.measure, ...measureSel(), ST.words ? "word view" : "token view"];
    if (ST.nosink && D.sink_available) parts.push("first token (sink) removed, renormalised");
    if (D.sink_removed) parts.push("first token (sink) was removed before capture");
    return "\u201c" + visible(queryLabel()) + "\u201d " + (ST.measure === "weights" ? "attends to" : "draws on") +
      " \u2014 " + parts.join(", ");
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
    for (let h = 0; h < (hasHeads() ? H : 1); h++) {
      const cells = new Float64Array(rows * cols);
      for (let qi = 0; qi < QS; qi++) {
        const row = selRow(li, hasHeads() ? h : -1, qi, sink), r = Math.floor(qi * rows / QS);
        if (!row) continue;
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
      fig.append(mat, el("figcaption", "", hasHeads() ? "head " + D.heads[h] : ST.measure + " (all heads)"));
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
    if (hasHeads()) D.heads.forEach((h) => head.appendChild(el("th", "", "H" + h)));
    else head.appendChild(el("th", "", ST.measure));
    table.appendChild(head);
    for (let l = 0; l < L; l++) {
      const tr = el("tr");
      tr.appendChild(el("th", "", "L" + D.layers[l]));
      for (let h = 0; h < (hasHeads() ? H : 1); h++) tr.appendChild(thumb(l, hasHeads() ? h : -1));
      table.appendChild(tr);
    }
    box.appendChild(table);
    $("modelcap").textContent = "Model view \u2014 \u201c" + visible(queryLabel()) + "\u201d in every layer " +
      "\u00d7 head (darker = more attention, each scaled to its own maximum); click to select";
  }
  function thumb(l, h) {
    const row = currentRow(l, h), n = Math.max(1, row ? row.labels.length : 1), cols = Math.min(n, 96);
    const cells = new Float64Array(cols);
    if (row) row.idx.forEach((i, m) => pool(cells, Math.floor(i * cols / n), Math.abs(row.vals[m])));
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
    ST.measure = $("measure").value;
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
    ["weights", ...Object.keys(D.measures)].forEach((m) => $("measure").appendChild(new Option(m, m)));
    $("measure").value = D.measures[D.measure] ? D.measure : "weights";
    ST.measure = $("measure").value;
    $("measure").addEventListener("change", readControls);
    if (D.sinks.length) {
      $("sinknote").textContent = D.sinks.map((s) => "Attention sink: " + JSON.stringify(s.token) + " " + s.why)
        .join(" ");
      $("sinknote").hidden = false;
    }
    $("words").addEventListener("change", readControls);
    $("nosink").addEventListener("change", readControls);
    $("nosink").disabled = !D.sink_available;
    $("csv").addEventListener("click", () => { const r = shownBars(); QKV.download("qkv-row.csv", "text/csv", QKV.csvBars(r.labels, r.values)); });
    $("json").addEventListener("click", () => {
      const r = shownBars();
      QKV.download("qkv-row.json", "application/json", JSON.stringify({caption: $("caption").textContent,
        keys: r.labels, values: r.values}, null, 1));
    });
    $("svg").addEventListener("click", () => { const r = shownBars(); QKV.download("qkv-row.svg", "image/svg+xml", QKV.svgBars(r.labels, r.values, $("caption").textContent)); });
    const qi = D.queries.indexOf(D.initial_query);
    ST.q = qi >= 0 && L > 0 && H > 0 ? qi : null;
    renderAll();
  }
  init();
})();
