"""Clone-with-overrides: merge a partial JobSpec into a stored (canonical) one.

A stored spec is canonical (every field explicit), so a naive merge would let stale explicit values
beat the override's intent: ``{"bits": "W3A3"}`` must also reset first/last-layer bits, and a new
preset (``{"budget": "cpu"}`` or ``{"budget": {"preset": "cpu"}}``) must replace the old preset's
values rather than be overridden by them.
"""

from __future__ import annotations

import copy
from typing import Any

from dfq.spec import parse_bits

PRESET_SECTIONS = ("method", "budget")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_overrides(canonical: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The spec a clone should run: ``canonical`` with ``overrides`` applied (shorthand accepted)."""
    overrides = dict(overrides)
    spec = copy.deepcopy(canonical)
    bits = overrides.pop("bits", None)
    if bits is not None:
        if not isinstance(bits, str):
            raise ValueError("bits must be a string such as 'W4A4'")
        quant = {"first_layer_bits": None, "last_layer_bits": None, **parse_bits(bits)}
        spec["quant"] = {**spec.get("quant", {}), **quant}
    for section in PRESET_SECTIONS:
        value = overrides.get(section)
        if isinstance(value, str):
            overrides[section] = value = {"preset": value}
        if isinstance(value, dict) and value.get("preset") is not None:
            spec[section] = overrides.pop(section)  # the new preset supplies every other field
    return _merge(spec, overrides)
