"use strict";
// qkv serve's page: submits a text, draws its tokens (only the blocks in view), and asks the server for
// the clicked token's row in the chosen measure, layer and head. Every string from the server or the
// user reaches the page through textContent (never as markup). The bars, the token display and the exports
// come from common.js and the styles from explorer.css, both shared with the offline explorer of `qkv
// explain --html`, whose head and model views (explorer.js) the page shows in a frame.
(function () {
  const $ = (id) => document.getElementById(id);
  const BLOCK = 400;  // tokens per block of the token strip; blocks out of view hold no token elements
  const ST = {text: null, query: null, row: null, gen: null, genToken: null, source: "text"};

  const el = QKV.el, visible = QKV.visible;
  function showError(msg) {
    $("error").textContent = msg;
    $("error").hidden = !msg;
  }
  async function call(url, options) {
    const r = await fetch(url, options);
    const data = await r.json().catch(() => ({error: "the server's answer was not JSON (status " + r.status + ")"}));
    if (!r.ok) throw new Error(data.error || ("status " + r.status));
    return data;
  }

  // -- submitting a text ---------------------------------------------------------------------------
  async function run() {
    showError("");
    $("go").disabled = true;
    $("meta").textContent = "running the model…";
    try {
      const t = await call("/api/texts", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({text: $("text").value, model: $("model").value})});
      if (ST.text) fetch("/api/texts/" + ST.text.id, {method: "DELETE"}).catch(() => {});
      ST.text = t; ST.query = null; HEAT.data = null;
      $("meta").textContent = t.model + " \u00b7 " + t.tokens.length + " tokens \u00b7 " + t.layers + " layers \u00d7 " +
        t.heads + " heads \u00b7 kept on the server: " + t.kept_mib + " MiB";
      fillSelect("layer", t.layers, "layer");
      fillSelect("head", t.heads, "head");
      const m = $("measure");
      m.replaceChildren(...Object.keys(t.measures).map((name) => new Option(name, name)));
      m.value = "norms";
      $("sinknote").textContent = t.sinks.map((s) => "Attention sink: " + JSON.stringify(s.token) + " " + s.why).join(" ");
      $("sinknote").hidden = !t.sinks.length;
      drawTokens();
      select(t.tokens.length - 1);
    } catch (e) {
      showError(e.message); $("meta").textContent = "";
    } finally {
      $("go").disabled = false;
    }
  }
  function fillSelect(id, n, what) {
    const s = $(id);
    s.replaceChildren(new Option("all", "-1"));
    for (let i = 0; i < n; i++) s.appendChild(new Option(what + " " + i, String(i)));
  }

  // -- the token strip: blocks rendered only while near the viewport ----------------------------------
  let observer = null;
  function drawTokens() {
    const box = $("tokens");
    box.replaceChildren();
    if (observer) observer.disconnect();
    observer = new IntersectionObserver((entries) => entries.forEach((e) => {
      if (e.isIntersecting) fillBlock(e.target); else emptyBlock(e.target);
    }), {root: box, rootMargin: "600px 0px"});
    for (let a = 0; a < ST.text.tokens.length; a += BLOCK) {
      const b = el("div", "block");
      b.dataset.start = String(a);
      b.style.minHeight = "2.2rem";
      box.appendChild(b);
      observer.observe(b);
    }
  }
  function fillBlock(b) {
    if (b.childElementCount) return;
    const a = Number(b.dataset.start), end = Math.min(a + BLOCK, ST.text.tokens.length);
    for (let i = a; i < end; i++) {
      const s = el("span", "tok q", visible(ST.text.tokens[i]));
      s.dataset.q = String(i);
      if (isSelected(i)) s.classList.add("sel");
      b.appendChild(s);
    }
    b.style.minHeight = b.offsetHeight + "px";  // keeps its place when emptied again
  }
  function emptyBlock(b) { b.replaceChildren(); }
  function isSelected(i) { return ST.row && ST.row.positions.includes(i); }
  function markSelection() {
    document.querySelectorAll("#tokens .tok.sel").forEach((s) => s.classList.remove("sel"));
    if (ST.row) ST.row.positions.forEach((p) => {
      const s = document.querySelector('#tokens .tok[data-q="' + p + '"]');
      if (s) s.classList.add("sel");
    });
  }

  // -- a row from the server ---------------------------------------------------------------------------
  function rowParams() {
    const p = new URLSearchParams({query: String(ST.query), measure: $("measure").value,
                                   words: $("words").checked ? "1" : "0", nosink: $("nosink").checked ? "1" : "0"});
    if ($("layer").value !== "-1") p.set("layer", $("layer").value);
    if ($("head").value !== "-1") p.set("head", $("head").value);
    return p;
  }
  async function select(q) {
    ST.query = q; ST.source = "text";
    showError("");
    try {
      ST.row = await call("/api/texts/" + ST.text.id + "/row?" + rowParams());
      drawBars();
      markSelection();
    } catch (e) {
      showError(e.message);
    }
  }
  function drawBars() {
    const r = ST.row, box = $("bars"), sinks = new Set();
    box.replaceChildren();
    r.sinks.forEach((s) => sinks.add(s.position));
    let top = 0;
    r.values.forEach((v) => { if (Math.abs(v) > top) top = Math.abs(v); });
    r.keys.forEach((label, i) => {
      const b = QKV.barEl(label, r.values[i], top, {key: i, self: i === r.own});
      if (!$("words").checked && ST.source === "text" && sinks.has(i + (r.sink_removed ? 1 : 0))) {
        b.classList.add("sink"); b.querySelector(".label").textContent += " \u25c0 sink";
      }
      box.appendChild(b);
    });
    const where = ($("layer").value === "-1" ? "all layers" : "layer " + $("layer").value) + ", " +
                  ($("head").value === "-1" ? "all heads" : "head " + $("head").value);
    const tokens = ST.source === "gen" ? ST.gen.tokens : ST.text.tokens;
    const who = ST.source === "gen" ? tokens[r.positions[0] + 1] + " (generated; its row = the query before it)"
                                    : tokens.slice(r.positions[0], r.positions[r.positions.length - 1] + 1).join("");
    $("caption").textContent = "\u201c" + visible(who) + "\u201d \u2014 " + r.measure + ", " + where +
      ($("words").checked ? ", word view" : ", token view") + (r.sink_removed ? ", first token removed" : "");
    let def = r.definition;
    if (r.logit) def += ". Target " + JSON.stringify(r.logit.target) + (r.logit.foil !== null ? " vs " +
      JSON.stringify(r.logit.foil) : "") + ": logit difference " + r.logit.logit_difference.toFixed(3) +
      ", remainder (MLPs, biases) " + r.logit.remainder.toFixed(3);
    $("definition").textContent = def;
  }

  // -- generation: server-sent events, then every generated token clickable --------------------------------
  async function generate() {
    showError("");
    $("gen").disabled = true;
    const box = $("gentokens");
    box.replaceChildren();
    try {
      const r = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({prompt: $("prompt").value, model: $("model").value, chat: $("chat").checked,
                              max_new_tokens: Number($("ntok").value), temperature: 0})});
      if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || ("status " + r.status));
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          onEvent(buf.slice(0, cut)); buf = buf.slice(cut + 2);
        }
      }
    } catch (e) {
      showError(e.message);
    } finally {
      $("gen").disabled = false;
    }
  }
  function onEvent(block) {
    const ev = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
    if (!ev || !data) return;
    const d = JSON.parse(data[1]);
    if (ev[1] === "token") $("gentokens").appendChild(el("span", "tok", visible(d.text)));
    else if (ev[1] === "error") showError(d.error);
    else if (ev[1] === "done") {
      ST.gen = d;
      if (!ST.text) { fillSelect("layer", d.layers, "layer"); fillSelect("head", d.heads, "head"); }
      const box = $("gentokens");
      box.replaceChildren();
      d.tokens.forEach((t, i) => {
        const s = el("span", i >= d.first_generated ? "tok q gen" : "tok", visible(t));
        if (i >= d.first_generated) s.dataset.g = String(i - d.first_generated);
        box.appendChild(s);
      });
    }
  }
  async function selectGenerated(i) {
    ST.genToken = i; ST.source = "gen";
    showError("");
    const p = new URLSearchParams({token: String(i)});
    if ($("layer").value !== "-1") p.set("layer", $("layer").value);
    if ($("head").value !== "-1") p.set("head", $("head").value);
    try {
      ST.row = await call("/api/generations/" + ST.gen.id + "/row?" + p);
      drawBars();
      document.querySelectorAll("#gentokens .tok.sel").forEach((s) => s.classList.remove("sel"));
      $("gentokens").querySelector('.tok[data-g="' + i + '"]').classList.add("sel");
    } catch (e) {
      showError(e.message);
    }
  }

  // -- exports ------------------------------------------------------------------------------------------
  // -- the heatmap: a layer's rows x keys on a canvas; drag a rectangle to zoom in, double-click to zoom out --
  const HEAT = {range: null, data: null, vals: null, drag: null};
  function heatParams(range) {
    const layer = $("layer").value === "-1" ? "0" : $("layer").value;
    const p = new URLSearchParams({layer: layer, measure: $("measure").value === "norms" ? "norms" : "weights",
                                   r0: String(range[0]), r1: String(range[1]), c0: String(range[2]),
                                   c1: String(range[3]), cells: "256"});
    if ($("head").value !== "-1") p.set("head", $("head").value);
    return p;
  }
  async function drawHeatmap(range) {
    if (!ST.text) return;
    const n = ST.text.tokens.length;
    HEAT.range = range || [0, n, 0, n];
    showError("");
    try {
      const d = await call("/api/texts/" + ST.text.id + "/heatmap?" + heatParams(HEAT.range));
      const bin = atob(d.values), u = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
      HEAT.data = d; HEAT.vals = new Float32Array(u.buffer);
      paintHeatmap();
    } catch (e) {
      showError(e.message);
    }
  }
  function paintHeatmap() {
    const d = HEAT.data, v = HEAT.vals, cv = $("heat");
    let top = 0;
    for (let i = 0; i < v.length; i++) if (Number.isFinite(v[i]) && v[i] > top) top = v[i];
    cv.width = d.cols; cv.height = d.rows;
    const ctx = cv.getContext("2d"), img = ctx.createImageData(d.cols, d.rows);
    for (let i = 0; i < v.length; i++) {
      const t = top > 0 ? Math.sqrt(Math.max(0, v[i]) / top) : 0;  // square root: small weights stay visible
      img.data[4 * i] = Math.round(255 - 206 * t); img.data[4 * i + 1] = Math.round(255 - 125 * t);
      img.data[4 * i + 2] = Math.round(255 - 49 * t); img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const exact = d.block[0] === 1 && d.block[1] === 1;
    $("heatcaption").textContent = $("measure").value.replace(/^(logit|mixing|rollout)$/, "weights") +
      " · layer " + d.layer + " · " + (d.head === null ? "mean of the heads" : "head " + d.head) +
      " · query rows " + d.r0 + "–" + (d.r1 - 1) + " × keys " + d.c0 + "–" + (d.c1 - 1) +
      (exact ? " · every cell exact" : " · each cell the largest value of a block of " + d.block[0] +
       " rows × " + d.block[1] + " keys (drag to zoom in)") + " · colour: √(value / " +
      top.toFixed(4) + ")";
  }
  function heatCell(e) {  // the (row, key) under the pointer, in token positions
    const d = HEAT.data, cv = $("heat"), box = cv.getBoundingClientRect();
    const c = Math.min(d.cols - 1, Math.max(0, Math.floor((e.clientX - box.left) / box.width * d.cols)));
    const r = Math.min(d.rows - 1, Math.max(0, Math.floor((e.clientY - box.top) / box.height * d.rows)));
    return {r: r, c: c, row: d.r0 + r * d.block[0], key: d.c0 + c * d.block[1]};
  }
  function heatHover(e) {
    if (!HEAT.data) return;
    const h = heatCell(e), d = HEAT.data, tok = ST.text.tokens;
    $("heat").title = "query " + h.row + " " + JSON.stringify(visible(tok[h.row])) + " × key " + h.key + " " +
      JSON.stringify(visible(tok[h.key])) + ": " + HEAT.vals[h.r * d.cols + h.c].toFixed(4) +
      (d.block[0] * d.block[1] > 1 ? " (largest in its block)" : "");
  }
  function heatZoom(a, b) {
    const d = HEAT.data;
    const r0 = d.r0 + Math.min(a.r, b.r) * d.block[0], r1 = Math.min(d.r1, d.r0 + (Math.max(a.r, b.r) + 1) * d.block[0]);
    const c0 = d.c0 + Math.min(a.c, b.c) * d.block[1], c1 = Math.min(d.c1, d.c0 + (Math.max(a.c, b.c) + 1) * d.block[1]);
    drawHeatmap([r0, r1, c0, c1]);
  }

  function init() {
    $("model").value = document.body.dataset.model;
    $("go").addEventListener("click", run);
    $("tokens").addEventListener("click", (e) => {
      const t = e.target.closest(".tok");
      if (t && ST.text) select(Number(t.dataset.q));
    });
    ["measure", "layer", "head", "words", "nosink"].forEach((id) => $(id).addEventListener("change", () => {
      if (ST.source === "gen" && ST.gen && ST.genToken !== null) selectGenerated(ST.genToken);
      else if (ST.text && ST.query !== null) select(ST.query);
    }));
    $("gen").addEventListener("click", generate);
    $("gentokens").addEventListener("click", (e) => {
      const t = e.target.closest(".tok.gen");
      if (t && ST.gen) selectGenerated(Number(t.dataset.g));
    });
    $("csv").addEventListener("click", () => {
      if (ST.row && ST.source === "text") location.href = "/api/texts/" + ST.text.id + "/row.csv?" + rowParams();
      else if (ST.row) QKV.download("qkv-row.csv", "text/csv", QKV.csvBars(ST.row.keys, ST.row.values));
    });
    $("json").addEventListener("click", () => {
      if (ST.row) QKV.download("qkv-row.json", "application/json", JSON.stringify(ST.row, null, 1));
    });
    $("svg").addEventListener("click", () => {
      if (ST.row) QKV.download("qkv-row.svg", "image/svg+xml", QKV.svgBars(ST.row.keys, ST.row.values, $("caption").textContent));
    });
    $("png").addEventListener("click", () => {
      if (ST.row && ST.source === "text") location.href = "/api/texts/" + ST.text.id + "/row.png?" + rowParams();
      else if (ST.row) showError("a PNG is made for a row of the text; for a generated token use SVG, CSV or JSON");
    });
    $("heatgo").addEventListener("click", () => drawHeatmap(null));
    $("heatpng").addEventListener("click", () => {
      if (!HEAT.data) return;
      const a = el("a");
      a.href = $("heat").toDataURL("image/png"); a.download = "qkv-heatmap.png";
      document.body.appendChild(a); a.click(); a.remove();
    });
    $("heat").addEventListener("mousemove", heatHover);
    $("heat").addEventListener("mousedown", (e) => { if (HEAT.data) HEAT.drag = heatCell(e); });
    $("heat").addEventListener("mouseup", (e) => {
      if (!HEAT.data || !HEAT.drag) return;
      const a = HEAT.drag, b = heatCell(e);
      HEAT.drag = null;
      if (a.r !== b.r || a.c !== b.c) heatZoom(a, b);
    });
    $("heat").addEventListener("dblclick", () => drawHeatmap(null));
    $("views").addEventListener("click", () => {  // the offline explorer's head and model views, from the server
      if (!ST.text || ST.query === null) return;
      $("viewframe").src = "/api/texts/" + ST.text.id + "/explorer.html?inline=1&query=" + ST.query;
      $("viewframe").hidden = false;
    });
    $("html").addEventListener("click", () => {
      if (ST.text && ST.query !== null) location.href = "/api/texts/" + ST.text.id + "/explorer.html?query=" + ST.query;
    });
    window.addEventListener("pagehide", () => {  // the server drops what it kept for this page's text
      if (ST.text) fetch("/api/texts/" + ST.text.id, {method: "DELETE", keepalive: true}).catch(() => {});
    });
  }
  init();
})();
