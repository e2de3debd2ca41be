// Teachers page: drag-and-drop upload straight to the API with a progress bar, then the intake
// status of the new checkpoint (pending -> ready, or rejected with its reason) without a reload.
"use strict";
(function () {
  const form = document.getElementById("upload-form");
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file");
  const bar = document.getElementById("upload-bar");
  const text = document.getElementById("upload-text");
  const status = document.getElementById("upload-status");
  const maxBytes = Number(form.dataset.maxBytes);
  let file = null;

  function pick(f) {
    file = f || null;
    document.getElementById("file-name").textContent = file ? file.name + " (" + (file.size / 1048576).toFixed(2) + " MB)" : "";
    zone.classList.toggle("has-file", !!file);
  }
  input.addEventListener("change", () => pick(input.files[0]));
  for (const ev of ["dragenter", "dragover"]) zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  zone.addEventListener("drop", (e) => {
    if (!e.dataTransfer.files.length) return;
    try { input.files = e.dataTransfer.files; } catch (err) { /* old browsers: the script still sends it */ }
    pick(e.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });

  function say(message, kind) {
    status.hidden = false;
    text.textContent = message;
    text.className = kind || "";
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!file) { say("Choose or drop a checkpoint file first.", "field-error"); return; }
    if (file.size > maxBytes) { say("This file is larger than the service accepts (" + (maxBytes / 1048576).toFixed(1) + " MB).", "field-error"); return; }
    const data = new FormData(form);
    data.set("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/checkpoints");
    xhr.setRequestHeader("X-CSRF-Token", dfq.csrf());
    xhr.upload.onprogress = (p) => {
      if (p.lengthComputable) { bar.value = (100 * p.loaded) / p.total; say("Uploading… " + Math.round(bar.value) + "%"); }
    };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (err) { /* not JSON */ }
      if (xhr.status === 202 && body) {
        bar.value = 100;
        say("Uploaded; validating " + body.name + " as " + body.arch + "…");
        addRow(body);
        watch(body.id);
        form.reset(); pick(null);
      } else {
        const d = body && body.detail;
        const msg = typeof d === "string" ? d : Array.isArray(d) ? d.map((x) => x.msg).join("; ") : "HTTP " + xhr.status;
        say("Upload refused: " + msg, "field-error");
      }
    };
    xhr.onerror = () => say("Upload failed: the connection was lost.", "field-error");
    bar.value = 0;
    say("Uploading… 0%");
    xhr.send(data);
  });

  function cells(c) {
    const badge = dfq.el("span", { class: "badge state-" + c.state, text: c.state });
    const stateCell = dfq.el("td", {}, badge);
    if (c.error) stateCell.append(dfq.el("div", { class: "field-error", text: c.error }));
    const link = dfq.el("td");
    if (c.state === "ready") link.append(dfq.el("a", { href: "/jobs/new?checkpoint=" + encodeURIComponent(c.id), text: "new job" }));
    return [dfq.el("td", { text: c.name }), dfq.el("td", { text: c.arch }), stateCell,
      dfq.el("td", { class: "num", text: (c.size_bytes / 1048576).toFixed(2) + " MB" }),
      dfq.el("td", {}, dfq.el("code", { text: c.sha256.slice(0, 12) })), link];
  }
  function addRow(c) {
    const tbody = document.querySelector("#checkpoints tbody");
    const empty = tbody.querySelector("tr.empty"); if (empty) empty.remove();
    const tr = dfq.el("tr", { "data-checkpoint-id": c.id, "data-state": c.state }, ...cells(c));
    tbody.prepend(tr);
  }
  function watch(cid) {
    const timer = setInterval(async () => {
      let c;
      try { c = await dfq.getJSON("/api/v1/checkpoints/" + encodeURIComponent(cid)); } catch (e) { return; }
      const tr = document.querySelector('tr[data-checkpoint-id="' + CSS.escape(cid) + '"]');
      if (tr) { tr.replaceChildren(...cells(c)); tr.dataset.state = c.state; }
      if (c.state !== "pending") {
        clearInterval(timer);
        if (c.state === "ready") say(c.name + " is ready.", "ok");
        else say(c.name + " was rejected: " + (c.error || "unknown reason"), "field-error");
      }
    }, 1000);
  }
  for (const tr of document.querySelectorAll('#checkpoints tr[data-state="pending"]')) watch(tr.dataset.checkpointId);
})();
