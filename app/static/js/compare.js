// Compare page: every metric the jobs logged, one chart each, one coloured line per job.
"use strict";
(function () {
  const root = document.getElementById("compare-charts");
  const jobs = JSON.parse(root.dataset.series);
  const board = dfqCharts.board(root);
  for (const s of document.querySelectorAll(".swatch[data-series]")) {
    s.style.background = dfqCharts.PALETTE[Number(s.dataset.series) % dfqCharts.PALETTE.length];
  }
  async function load(job) {
    const info = await dfq.getJSON("/api/v1/jobs/" + job.id);
    const stride = Math.max(1, Math.floor((info.total || 1) / 1500));
    const [steps, evals] = await Promise.all([
      dfq.getJSON("/api/v1/jobs/" + job.id + "/metrics?kind=step&limit=100000&stride=" + stride),
      dfq.getJSON("/api/v1/jobs/" + job.id + "/metrics?kind=eval"),
    ]);
    const s = dfqCharts.series();
    s.add(steps, "");
    s.add(evals.map((p) => ({ step: p.step, values: { q_top1: p.values.q_top1 } })), "eval:");
    return s;
  }
  Promise.all(jobs.map(load)).then((all) => {
    const keys = new Set();
    for (const s of all) for (const k of s.cols.keys()) keys.add(k);
    for (const key of [...keys].sort()) {
      const tables = all.map((s) => {
        const col = s.cols.get(key);
        const xs = [], ys = [];
        if (col) s.xs.forEach((x, i) => { if (col[i] !== null) { xs.push(x); ys.push(col[i]); } });
        return [xs, ys];
      });
      const data = uPlot.join(tables);
      board.draw(key, jobs.map((j, i) => ({ label: j.label, color: dfqCharts.PALETTE[i % dfqCharts.PALETTE.length] })), data);
    }
    if (!keys.size) root.append(dfq.el("p", { class: "muted", text: "These jobs logged no metrics yet." }));
  }).catch((e) => root.append(dfq.el("p", { class: "field-error", text: "Could not load metrics: " + e.message })));
})();
