"use strict";
// What the offline explorer (`qkv explain --html`, inlined into the file) and the served page (`qkv serve`,
// /static/common.js) share: element building, how a token is shown, one bar of a chart, and the exports of
// the bars shown (SVG, CSV, JSON). Every string reaches the page through textContent, never as markup.
const QKV = (function () {
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
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
  function fmt(v) { return Number.isFinite(v) ? v.toFixed(4) : String(v); }
  // One bar: label, a fill scaled to `top`, the value. o.key (null: the "other keys" bar), o.self.
  function barEl(label, v, top, o) {
    const b = el("div", "bar"), fill = el("span", "fill"), track = el("span", "track");
    if (o.key !== null && o.key !== undefined) { b.dataset.key = String(o.key); b.dataset.value = String(v); }
    else b.dataset.rest = String(v);
    if (o.self) b.classList.add("self");
    if (!Number.isFinite(v)) b.classList.add("bad");
    if (v < 0) b.classList.add("neg");
    const lab = el("span", "label", visible(label));
    lab.title = label;
    b.dataset.label = label;
    fill.style.width = (Number.isFinite(v) && top > 0 ? Math.min(1, Math.abs(v) / top) * 100 : 0) + "%";
    track.appendChild(fill);
    b.append(lab, track, el("span", "num", fmt(v)));
    return b;
  }
  // The bars as an SVG document, built as a DOM tree so that every label is escaped.
  function svgBars(labels, values, title) {
    const NS = "http://www.w3.org/2000/svg", rowH = 18, w = 640;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("xmlns", NS);
    svg.setAttribute("width", String(w));
    svg.setAttribute("height", String(rowH * (labels.length + 2)));
    const head = document.createElementNS(NS, "text");
    head.setAttribute("x", "4"); head.setAttribute("y", "14");
    head.textContent = title;
    svg.appendChild(head);
    let top = 0;
    values.forEach((v) => { if (Number.isFinite(v)) top = Math.max(top, Math.abs(v)); });
    labels.forEach((k, i) => {
      const y = rowH * (i + 1) + 4, label = document.createElementNS(NS, "text");
      label.setAttribute("x", "150"); label.setAttribute("y", String(y + 12));
      label.setAttribute("text-anchor", "end");
      label.textContent = visible(k);
      const bar = document.createElementNS(NS, "rect");
      bar.setAttribute("x", "156"); bar.setAttribute("y", String(y + 2));
      bar.setAttribute("height", String(rowH - 4));
      bar.setAttribute("width", String(top > 0 && Number.isFinite(values[i]) ? Math.abs(values[i]) / top * 400 : 0));
      bar.setAttribute("fill", values[i] < 0 ? "#dd6b20" : "#3182ce");
      const num = document.createElementNS(NS, "text");
      num.setAttribute("x", "566"); num.setAttribute("y", String(y + 12));
      num.textContent = fmt(values[i]);
      svg.append(label, bar, num);
    });
    return new XMLSerializer().serializeToString(svg);
  }
  function csvBars(labels, values) {
    const q = (s) => /[",\n\r]/.test(s) || s !== s.trim() ? "\"" + s.replace(/"/g, "\"\"") + "\"" : s;
    return "key,value\n" + labels.map((k, i) => q(k) + "," + values[i]).join("\n") + "\n";
  }
  function download(name, type, text) {
    const a = el("a");
    a.href = URL.createObjectURL(new Blob([text], {type: type}));
    a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
  }
  return {el: el, visible: visible, fmt: fmt, barEl: barEl, svgBars: svgBars, csvBars: csvBars, download: download};
})();
