// Tiny inline-SVG charts (no dependency, works offline). Every number drawn is also kept in a
// data-* attribute so the browser test can read back exactly what is shown.
"use strict";
(function (global) {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = { "2xx": "#16a34a", "3xx": "#2563eb", "4xx": "#dc6803", "5xx": "#b42318", all: "#2563eb" };
  const PALETTE = ["#2563eb", "#16a34a", "#dc6803", "#9333ea", "#0891b2", "#b42318", "#64748b"];

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function colorOf(group, i) { return COLORS[group] || PALETTE[i % PALETTE.length]; }
  function fmt(n) { return Number(n).toLocaleString("en-US"); }
  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function legend(container, groups) {
    const div = document.createElement("div");
    div.className = "legend";
    groups.forEach((g, i) => {
      const span = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = colorOf(g.group, i);
      span.append(swatch, document.createTextNode(`${g.group} (${fmt(g.total_requests)})`));
      div.append(span);
    });
    container.append(div);
  }

  // Stacked bars over time: one bar per bucket, one layer per group of a UsageSeries.
  function stackedSeries(container, series, opts) {
    container.replaceChildren();
    const groups = series.groups;
    const n = series.buckets;
    const t0 = Date.parse(series.since);
    const bucketIso = (i) => new Date(t0 + i * series.step_seconds * 1000).toISOString().replace(".000Z", "Z");
    const W = 900, H = (opts && opts.height) || 220, L = 50, B = 22, T = 8;
    const totals = new Array(n).fill(0);
    groups.forEach((g) => g.requests.forEach((v, i) => { totals[i] += v; }));
    const max = niceMax(Math.max(0, ...totals));
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-total": totals.reduce((a, b) => a + b, 0), "data-buckets": n });
    const plotW = W - L - 8, plotH = H - B - T, bw = n ? plotW / n : 0;
    for (const f of [0, 0.5, 1]) {
      const y = T + plotH * (1 - f);
      svg.append(el("line", { x1: L, x2: W - 8, y1: y, y2: y, class: "axis", "stroke-dasharray": f ? "2,3" : "" }));
      svg.append(el("text", { x: L - 4, y: y + 4, "text-anchor": "end" }, fmt(max * f)));
    }
    const base = new Array(n).fill(0);
    groups.forEach((g, gi) => {
      const layer = el("g", { "data-group": g.group, fill: colorOf(g.group, gi) });
      g.requests.forEach((v, i) => {
        if (!v) return;
        const h = (v / max) * plotH;
        const y = T + plotH - (base[i] / max) * plotH - h;
        const bucket = bucketIso(i);
        const rect = el("rect", { x: L + i * bw, y, width: Math.max(bw - 1, 0.5), height: h, "data-value": v, "data-bucket": bucket });
        rect.append(el("title", {}, `${bucket} ${g.group}: ${fmt(v)}`));
        layer.append(rect);
        base[i] += v;
      });
      svg.append(layer);
    });
    const ticks = Math.min(6, n);
    for (let t = 0; t < ticks; t++) {
      const i = Math.floor((t * n) / ticks);
      const label = bucketIso(i).slice(5, 16).replace("T", " ");
      svg.append(el("text", { x: L + i * bw, y: H - 6 }, label));
    }
    container.append(svg);
    legend(container, groups);
    return svg;
  }

  // Horizontal bars: one per entry, label on the left, value at the end of the bar.
  function horizontalBars(container, entries, onClick) {
    container.replaceChildren();
    const W = 600, row = 22, L = 230, H = Math.max(entries.length, 1) * row + 6;
    const max = niceMax(Math.max(0, ...entries.map((e) => e.value)));
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-count": entries.length });
    entries.forEach((e, i) => {
      const g = el("g", { class: "bar", "data-key-id": e.id, "data-value": e.value });
      const y = 3 + i * row;
      const label = el("text", { x: L - 6, y: y + 14, "text-anchor": "end", class: "bar-label" }, e.label);
      label.addEventListener("click", () => onClick && onClick(e.id));
      const w = Math.max(((W - L - 70) * e.value) / max, 1);
      const rect = el("rect", { x: L, y: y + 2, width: w, height: row - 6, fill: e.color || "#2563eb" });
      rect.addEventListener("click", () => onClick && onClick(e.id));
      g.append(label, rect, el("text", { x: L + w + 4, y: y + 14 }, fmt(e.value)));
      g.append(el("title", {}, e.title || `${e.id}: ${fmt(e.value)}`));
      svg.append(g);
    });
    if (!entries.length) svg.append(el("text", { x: 8, y: 16 }, "no traffic in this window"));
    container.append(svg);
    return svg;
  }

  global.MeterCharts = { stackedSeries, horizontalBars, fmt };
})(window);
