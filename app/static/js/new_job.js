// New-job form: open the components of the ticked method blocks, show the chosen budget and
// quantization presets' values as placeholders, and enable teachers in the picker once their intake finished.
"use strict";
(function () {
  const form = document.getElementById("new-job");
  function syncBlocks() {
    const on = new Set([...form.querySelectorAll('input[name="method.blocks"]:checked')].map((i) => i.value));
    for (const d of form.querySelectorAll("details.block-section")) {
      const active = on.has(d.dataset.block);
      d.toggleAttribute("data-off", !active);
      if (active && !d.dataset.seen) { d.open = true; d.dataset.seen = "1"; }
      if (!active) { d.open = false; d.dataset.seen = ""; }
    }
  }
  for (const box of form.querySelectorAll('input[name="method.blocks"]')) box.addEventListener("change", syncBlocks);
  for (const d of form.querySelectorAll("details.block-section[open]")) d.dataset.seen = "1";

  // A preset select fills its section's placeholders (and its selects' "preset (...)" option) with the
  // chosen preset's values, so empty fields say what the job will get. Where a filled field takes away
  // what a preset's field serves (needs: dfq/spec.py QUANT_PRESET_NEEDS), that field shows the default
  // ("" preset), as the spec will resolve it.
  function presetPlaceholders(select, presets, section, needs) {
    const own = (k) => {
      const input = form.querySelector('[name="' + section + "." + k + '"]');
      return input && input.value !== "" ? input.value : null;
    };
    function resolved() {
      const values = Object.assign({}, presets[select.value] || {});
      if (!needs || !select.value) return values;
      const plain = presets[""] || {};
      const now = (k) => (own(k) !== null ? own(k) : String(values[k]));
      let dropped = true;
      while (dropped) {
        dropped = false;
        for (const [field, conditions] of Object.entries(needs)) {
          if (own(field) !== null || values[field] === plain[field]) continue;
          if (Object.entries(conditions).some(([k, v]) => now(k) !== String(v))) {
            values[field] = plain[field];
            dropped = true;
          }
        }
      }
      return values;
    }
    function sync() {
      const values = resolved();
      for (const [k, v] of Object.entries(values)) {
        const input = form.querySelector('[name="' + section + "." + k + '"]');
        if (!input) continue;
        const shown = v === null ? "" : Array.isArray(v) ? (v.length ? v.join(", ") : "none") : String(v);
        if (input.tagName === "SELECT") { if (input.options[0] && input.options[0].value === "") input.options[0].textContent = "preset (" + shown + ")"; }
        else input.placeholder = shown;
      }
    }
    select.addEventListener("change", sync);
    if (needs) {
      for (const input of form.querySelectorAll('[name^="' + section + '."]')) input.addEventListener("change", sync);
    }
    sync();
  }
  presetPlaceholders(document.getElementById("budget-preset"), JSON.parse(form.dataset.budgetPresets), "budget");
  presetPlaceholders(document.getElementById("quant-preset"), JSON.parse(form.dataset.quantPresets), "quant",
    JSON.parse(form.dataset.quantNeeds));

  const pending = [...form.querySelectorAll('#checkpoint option[data-state="pending"]')];
  if (pending.length) {
    const timer = setInterval(async () => {
      for (const opt of pending.filter((o) => o.disabled)) {
        try {
          const c = await dfq.getJSON("/api/v1/checkpoints/" + encodeURIComponent(opt.value));
          if (c.state !== "pending") {
            opt.dataset.state = c.state;
            opt.textContent = c.name + " (" + c.arch + ")" + (c.state === "ready" ? "" : " — " + c.state);
            opt.disabled = c.state !== "ready";
            if (c.state === "ready" && !document.getElementById("checkpoint").value) opt.selected = true;
          }
        } catch (e) { /* next tick */ }
      }
      if (pending.every((o) => o.dataset.state !== "pending")) clearInterval(timer);
    }, 1000);
  }
})();
