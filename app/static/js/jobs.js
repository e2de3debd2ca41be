// Jobs list: re-render the table body from the server every few seconds (faster while jobs run),
// keeping the compare checkboxes ticked. Without JavaScript the page is the same, just static.
"use strict";
(function () {
  const toggle = document.getElementById("autorefresh");
  let timer = null;
  function rowsUrl() {
    const u = new URL(location.href);
    u.searchParams.set("fragment", "rows");
    return u.toString();
  }
  async function refresh() {
    try {
      const r = await fetch(rowsUrl(), { credentials: "same-origin" });
      if (r.status === 401 || r.redirected) { location.reload(); return; }
      const html = await r.text();
      const t = document.createElement("template");
      t.innerHTML = "<table>" + html + "</table>";  // server-rendered and escaped by Jinja2
      const fresh = t.content.querySelector("tbody");
      const old = document.getElementById("jobs-rows");
      const picked = new Set([...old.querySelectorAll("input[name=ids]:checked")].map((i) => i.value));
      for (const box of fresh.querySelectorAll("input[name=ids]")) box.checked = picked.has(box.value);
      old.replaceWith(fresh);
    } catch (e) { /* a missed refresh is retried on the next tick */ }
    schedule();
  }
  function schedule() {
    clearTimeout(timer);
    if (!toggle.checked) return;
    const active = (document.getElementById("jobs-rows") || {}).dataset?.active === "yes";
    timer = setTimeout(refresh, active ? 2000 : 10000);
  }
  toggle.addEventListener("change", schedule);
  for (const input of document.querySelectorAll("#filters input[type=checkbox][name=state]")) {
    input.addEventListener("change", () => document.getElementById("filters").submit());
  }
  schedule();
})();
