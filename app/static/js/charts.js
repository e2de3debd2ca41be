// Small-multiple line charts (uPlot, vendored under /static/vendor/uplot): one chart per metric,
// grouped by what the metric belongs to, so that each curve keeps its own scale.
"use strict";
window.dfqCharts = (function () {
  const GROUPS = [
    ["Generator", (k) => k.startsWith("g_")],
    ["Student", (k) => k.startsWith("s_")],
    ["Evaluation", (k) => k.startsWith("eval:")],
    ["Method diagnostics", (k) => /^(diag_|acq_|fdda_|dsg_|lrq_)/.test(k)],
    ["Optimiser and speed", (k) => /^(lr_|it_per_s)/.test(k)],
    ["Other", () => true],
  ];
  const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777"];
  const HEIGHT = 170;
  const STEP_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2500, 5e3, 1e4, 2e4, 25e3, 5e4, 1e5, 2e5, 5e5, 1e6];
  // tick labels that stay readable for learning rates (1e-4) and losses (12.5) alike
  function tick(v) {
    if (v === null || v === undefined) return "";
    const a = Math.abs(v);
    if (a !== 0 && (a < 0.01 || a >= 1e5)) return v.toExponential(0);
    return String(Number(v.toPrecision(4)));
  }

  function groupOf(key) {
    for (const [name, test] of GROUPS) if (test(key)) return name;
    return "Other";
  }
  function label(key) { return key.startsWith("eval:") ? key.slice(5) + " (eval)" : key; }

  // A board: headed groups of charts inside `root`, created lazily as metrics appear.
  function board(root) {
    const groups = new Map(), charts = new Map();
    function groupNode(name) {
      if (!groups.has(name)) {
        const body = dfq.el("div", { class: "chart-grid" });
        const section = dfq.el("section", { class: "chart-group", "data-group": name }, dfq.el("h3", { text: name }), body);
        // keep the GROUPS order on the page whatever order metrics arrive in
        const order = GROUPS.map((g) => g[0]);
        const after = [...root.querySelectorAll(".chart-group")].find(
          (s) => order.indexOf(s.dataset.group) > order.indexOf(name));
        root.insertBefore(section, after || null);
        groups.set(name, body);
      }
      return groups.get(name);
    }
    // series: [{label, color}]; data: [xs, ys1, ys2, ...]
    function draw(key, series, data) {
      let c = charts.get(key);
      if (!c) {
        const holder = dfq.el("div", { class: "chart", "data-metric": key });
        groupNode(groupOf(key)).append(holder);
        const opts = {
          title: label(key), width: Math.max(260, holder.clientWidth || 320), height: HEIGHT,
          scales: { x: { time: false } },
          legend: { show: true, live: true },
          cursor: { drag: { x: true, y: false } },
          axes: [{ size: 28, font: "11px system-ui", incrs: STEP_INCRS },
            { size: 56, font: "11px system-ui", values: (u, splits) => splits.map(tick) }],
          series: [{ label: "step" }, ...series.map((s, i) => ({
            label: s.label, stroke: s.color || PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true,
            points: { show: data[0].length < 40 },
          }))],
        };
        c = new uPlot(opts, data, holder);
        charts.set(key, c);
      } else {
        c.setData(data);
      }
      return c;
    }
    return { draw, charts };
  }

  // Step metrics of one job, appended incrementally: {step: [...], values: {key: [...]}}.
  function series() {
    const xs = [], cols = new Map();
    function add(points, prefix) {
      for (const p of points) {
        const i = xs.length;
        xs.push(p.step);
        for (const [k, v] of Object.entries(p.values)) {
          if (typeof v !== "number" && v !== null) continue;
          const key = prefix + k;
          if (!cols.has(key)) cols.set(key, new Array(i).fill(null));
          cols.get(key).push(v);
        }
        for (const col of cols.values()) if (col.length < xs.length) col.push(null);
      }
    }
    return { xs, cols, add };
  }

  return { board, series, PALETTE, groupOf };
})();
