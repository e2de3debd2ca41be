// The job page, live: progress from the job's SSE stream (polling when the stream is unavailable),
// curves from the metrics endpoint, the sample/attention slider from the artifact list, the log.
"use strict";
(function () {
  const root = document.getElementById("job");
  const id = root.dataset.jobId;
  const api = "/api/v1/jobs/" + id;
  const TERMINAL = new Set(["done", "failed", "cancelled"]);
  const $ = (x) => document.getElementById(x);
  let state = root.dataset.state;
  const total = () => Number($("total").textContent) || Number(root.dataset.total) || 1;

  // ------------------------------------------------------------------ progress
  function setState(s) {
    if (!s || s === state && $("state").textContent.trim() === s) return;
    state = s;
    root.dataset.state = s;
    const badge = dfq.el("span", { class: "badge state-" + s, "data-state": "", text: s });
    $("state").replaceChildren(badge);
  }
  function show(d) {
    if (d.state) setState(d.state);
    if (d.phase) $("phase").textContent = d.phase;
    if (typeof d.total === "number" && d.total > 0) { $("total").textContent = d.total; $("bar").max = d.total; }
    if (typeof d.step === "number") {
      $("step").textContent = d.step;
      $("bar").value = state === "done" ? $("bar").max : d.step;
    }
    if ("eta_s" in d) $("eta").textContent = TERMINAL.has(state) ? "—" : dfq.duration(d.eta_s);
    if (d.attempts !== undefined) $("attempts").textContent = d.attempts + "/" + d.max_attempts;
    if (d.error) { $("error").textContent = d.error + (d.error_phase ? " (phase " + d.error_phase + ")" : ""); $("error").hidden = false; }
    if (d.metrics && Object.keys(d.metrics).length && !("q_top1" in d.metrics && Object.keys(d.metrics).length <= 3)) {
      const dl = $("latest");
      dl.replaceChildren(...Object.entries(d.metrics).map(([k, v]) =>
        dfq.el("div", {}, dfq.el("dt", { text: k }), dfq.el("dd", { text: dfq.num(v, 4) }))));
    }
    if (d.cancel_requested && $("cancel-button")) { $("cancel-button").disabled = true; $("cancel-button").textContent = "Cancelling…"; }
    if (TERMINAL.has(state)) finish();
  }

  let polling = null;
  function poll() {
    if (polling) return;
    $("transport").textContent = "polling";
    polling = setInterval(async () => {
      try { show(await dfq.getJSON(api)); } catch (e) { /* retried next tick */ }
    }, 2000);
  }
  function follow() {
    if (TERMINAL.has(state)) { $("transport").textContent = "finished"; return; }
    if (typeof EventSource === "undefined") { poll(); return; }
    const es = new EventSource(api + "/events");
    $("transport").textContent = "connecting…";
    es.onopen = () => { $("transport").textContent = "live (SSE)"; };
    for (const kind of ["snapshot", "progress", "phase", "step", "eval", "samples", "checkpoint", "state"]) {
      es.addEventListener(kind, (e) => {
        const d = JSON.parse(e.data);
        show(d);
        if (kind === "samples") refreshArtifacts();
      });
    }
    es.addEventListener("end", () => { es.close(); dfq.getJSON(api).then(show); });
    es.onerror = () => {
      // The browser retries by itself while CONNECTING; a CLOSED stream (or a proxy that buffers
      // it) falls back to polling the job row, which is the truth anyway.
      if (es.readyState === EventSource.CLOSED && !TERMINAL.has(state)) { es.close(); poll(); }
    };
  }

  // ------------------------------------------------------------------ curves
  const charts = dfqCharts.board($("charts"));
  const stepData = dfqCharts.series(), evalData = dfqCharts.series();
  let lastStep = -1, lastEval = -1;
  const stride = () => Math.max(1, Math.floor(total() / 1500));
  async function refreshMetrics() {
    try {
      const [steps, evals] = await Promise.all([
        dfq.getJSON(api + "/metrics?kind=step&limit=100000&stride=" + stride() + "&after_step=" + lastStep),
        dfq.getJSON(api + "/metrics?kind=eval&after_step=" + lastEval),
      ]);
      if (steps.length) { stepData.add(steps, ""); lastStep = steps[steps.length - 1].step; }
      if (evals.length) {
        evalData.add(evals.map((p) => ({ step: p.step, values: { q_top1: p.values.q_top1 } })), "eval:");
        lastEval = evals[evals.length - 1].step;
      }
      for (const [key, col] of stepData.cols) charts.draw(key, [{ label: key }], [stepData.xs, col]);
      for (const [key, col] of evalData.cols) charts.draw(key, [{ label: "top-1 %" }], [evalData.xs, col]);
      if (!stepData.xs.length && !evalData.xs.length && !$("charts").querySelector(".empty")) {
        $("charts").append(dfq.el("p", { class: "muted empty", text: "No metrics logged yet." }));
      } else if (stepData.xs.length) {
        const e = $("charts").querySelector(".empty"); if (e) e.remove();
      }
    } catch (e) { /* retried on the next tick */ }
  }

  // ------------------------------------------------------------------ samples and attention
  const slider = $("step-slider");
  let steps = [], byStep = new Map(), follow_latest = true;
  function readArtifacts(list) {
    const samples = new Map(), att = new Map(), attJson = new Map();
    for (const a of list) {
      let m = /^samples\/step_(\d+)\.png$/.exec(a.name); if (m) samples.set(Number(m[1]), a.url);
      m = /^attention\/step_(\d+)\.png$/.exec(a.name); if (m) att.set(Number(m[1]), a.url);
      m = /^attention\/step_(\d+)\.json$/.exec(a.name); if (m) attJson.set(Number(m[1]), a.url);
    }
    const fresh = [...samples.keys()].sort((a, b) => a - b);
    byStep = new Map(fresh.map((s) => [s, { samples: samples.get(s), attention: att.get(s), stats: attJson.get(s) }]));
    const grew = fresh.length !== steps.length;
    steps = fresh;
    if (!steps.length) return;
    slider.disabled = false;
    slider.max = steps.length - 1;
    if (grew && follow_latest) slider.value = steps.length - 1;
    $("slider-count").textContent = steps.length + " snapshot" + (steps.length === 1 ? "" : "s");
    if (grew) showStep();
  }
  function showImage(img, url) {
    if (!url) { img.hidden = true; img.removeAttribute("src"); return; }
    if (img.getAttribute("src") !== url) {
      img.onload = () => { img.hidden = false; };
      img.src = url;
    }
  }
  async function showStep() {
    const step = steps[Number(slider.value)];
    const entry = byStep.get(step);
    if (!entry) return;
    $("slider-step").textContent = step + " / " + total();
    $("samples-empty").hidden = true;
    showImage($("samples-img"), entry.samples);
    showImage($("attention-img"), entry.attention);
    if (entry.stats) {
      try {
        const s = await dfq.getJSON(entry.stats);
        if (steps[Number(slider.value)] !== step) return;
        $("attention-stage").textContent = s.stage;
        const per = Math.max(1, s.per_row || 1), rows = [];
        for (let i = 0; i < s.tv.length; i += per) {
          const chunk = s.tv.slice(i, i + per);
          rows.push(dfq.el("li", { title: "mean total-variation distance of the two maps", text: "TV " + dfq.num(chunk.reduce((a, b) => a + b, 0) / chunk.length) }));
        }
        $("attention-rows").replaceChildren(...rows);
        $("attention-stats").textContent = "Step " + step + ": mean total-variation distance between teacher and student maps " +
          dfq.num(s.tv_mean, 3) + "; attention centers " + dfq.num(s.center_shift_mean, 3) + " image widths apart.";
      } catch (e) { /* the figure itself is still shown */ }
    }
  }
  slider.addEventListener("input", () => { follow_latest = Number(slider.value) === steps.length - 1; showStep(); });
  async function refreshArtifacts() {
    try { readArtifacts(await dfq.getJSON(api + "/artifacts")); } catch (e) { /* next tick */ }
  }

  // ------------------------------------------------------------------ log
  async function refreshLog() {
    const log = $("log");
    try {
      const lines = await dfq.getJSON(api + "/logs?after=" + (log.dataset.lastId || 0));
      for (const l of lines) {
        const t = new Date(l.time);
        log.append(dfq.el("li", { class: "level-" + l.level }, dfq.el("time", { text: t.toISOString().slice(11, 19) }), " " + l.message));
        log.dataset.lastId = l.id;
      }
      if (lines.length) log.scrollTop = log.scrollHeight;
    } catch (e) { /* next tick */ }
  }

  // ------------------------------------------------------------------ end of the run
  let finished = false, ticker = null;
  async function finish() {
    if (finished) return;
    finished = true;
    clearInterval(ticker); clearInterval(polling);
    $("transport").textContent = "finished";
    $("eta").textContent = "—";
    await Promise.all([refreshMetrics(), refreshArtifacts(), refreshLog()]);
    // the results (accuracy, per-layer error, artifacts, buttons) are rendered by the server
    try {
      const r = await fetch(location.href, { credentials: "same-origin" });
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const node of document.querySelectorAll("[data-refresh]")) {
        const fresh = doc.getElementById(node.id);
        if (fresh) node.replaceWith(document.importNode(fresh, true));
      }
      const stats = doc.getElementById("attention-stats");
      if (stats && stats.textContent.trim() && follow_latest) {
        $("attention-stats").textContent = stats.textContent;
      }
    } catch (e) { /* a reload shows them */ }
  }

  // ------------------------------------------------------------------ start
  const initial = JSON.parse($("artifact-list").textContent);
  readArtifacts(initial);
  refreshMetrics();
  if (TERMINAL.has(state)) {
    $("transport").textContent = "finished";
  } else {
    follow();
    ticker = setInterval(() => { refreshMetrics(); refreshArtifacts(); refreshLog(); }, 2000);
  }
})();
