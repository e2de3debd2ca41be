// Shared by every page: the session's CSRF token for scripted POSTs, and small DOM helpers.
// Everything user-provided is put into the page with textContent, never innerHTML.
"use strict";
window.dfq = (function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }
  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }
  function duration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return h + " h " + String(m).padStart(2, "0") + " min";
    return m ? m + " min " + String(sec).padStart(2, "0") + " s" : sec + " s";
  }
  function num(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "—";
    const d = digits === undefined ? 2 : digits;
    return v !== 0 && Math.abs(v) < Math.pow(10, -d) ? v.toExponential(1) : v.toFixed(d);
  }
  return { csrf, el, getJSON, duration, num };
})();
