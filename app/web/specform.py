"""The new-job form, generated from ``dfq.spec``'s pydantic models, and its way back to a JobSpec.

Fields are named by their dotted path in the spec (``budget.epochs``, ``method.dsg.sci``), so a
pydantic error's ``loc`` names the input it belongs to and the page shows it right there. A new
field in ``dfq.spec`` appears in the form without touching this module.

Rules that keep presets meaningful: a method is the GDFQ baseline plus the blocks ticked (the
preset is their '+' combination, e.g. ``dsg+lrq``); numbers and shared settings left empty take the
preset's value (the placeholder shows the default); a ticked block's switches are always sent.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from dfq.spec import (
    BUDGET_PRESETS,
    QUANT_PRESETS,
    ACQSpec,
    BudgetSpec,
    DSGSpec,
    FDDASpec,
    LRQSpec,
    MethodSpec,
    QuantSpec,
    parse_bits,
)

BLOCKS: dict[str, tuple[type[BaseModel], str]] = {
    "dsg": (DSGSpec, "DSG: slack BN alignment, layerwise sample enhancement, correlation inhibition"),
    "fdda": (FDDASpec, "FDDA: class-center distribution alignment"),
    "acq": (ACQSpec, "ACQ: attention-center conditioning and consistency"),
    "lrq": (LRQSpec, "LRQ: long-range generator, adversarial margin, decoupled KD"),
}
BIT_FIELDS = {"w_bits", "a_bits", "first_layer_bits", "last_layer_bits"}  # the bits field sets them
SKIP = {
    "method": {"preset", *BLOCKS},
    "quant": {"preset", *BIT_FIELDS},  # the preset has a select of its own
    "budget": {"preset", "g_betas"},
}
TOP_LEVEL = (
    "checkpoint_id",
    "method.blocks",
    "bits",
    "quant.preset",
    "budget.preset",
    "seed",
    "eval",
    "eval_limit",
    "device",
)
EVAL_SETS = ("fashion-mnist", "fashion-mnist-train")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FormField:
    """One input: ``kind`` is bool, int, float, text, choice or list (comma-separated ints)."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    always: bool = False  # sent even when left as is (block switches); else empty means "preset"

    @property
    def label(self) -> str:
        return self.name.rsplit(".", 1)[-1].replace("_", " ")

    @property
    def placeholder(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, list):
            return ", ".join(str(v) for v in self.default)
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


@dataclass
class Section:
    name: str
    title: str
    fields: list[FormField] = field(default_factory=list)
    block: str | None = None


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]] | None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0]) if len(rest) == 1 else None
    if origin is Literal:
        return "choice", tuple(str(a) for a in args)
    if origin is list and args == (int,):
        return "list", ()
    if annotation is bool:
        return "bool", ()
    return {int: ("int", ()), float: ("float", ()), str: ("text", ())}.get(annotation)


def _fields(model: type[BaseModel], prefix: str, skip: set[str], block: bool) -> list[FormField]:
    out = []
    for name, info in model.model_fields.items():
        kind = _kind(info.annotation)
        if name in skip or kind is None:
            continue
        default = info.get_default(call_default_factory=True)
        always = block and kind[0] in ("bool", "choice")
        out.append(FormField(f"{prefix}.{name}", kind[0], default, info.description or "", kind[1], always))
    return out


def sections() -> list[Section]:
    """The form's fieldsets below the main row, in page order."""
    out = [
        Section(f"method.{key}", title, _fields(model, f"method.{key}", set(), True), key)
        for key, (model, title) in BLOCKS.items()
    ]
    out.append(
        Section("method", "Shared method settings", _fields(MethodSpec, "method", SKIP["method"], False))
    )
    out.append(Section("quant", "Quantization", _fields(QuantSpec, "quant", SKIP["quant"], False)))
    out.append(
        Section(
            "budget",
            "Budget (empty: the preset's value)",
            _fields(BudgetSpec, "budget", SKIP["budget"], False),
        )
    )
    return out


def all_fields() -> dict[str, FormField]:
    return {f.name: f for s in sections() for f in s.fields}


def known_names() -> set[str]:
    return {*all_fields(), *TOP_LEVEL, *(s.name for s in sections()), "quant", "extra"}


# ------------------------------------------------------------------------------------ form -> spec


class FormErrors(Exception):
    """Errors keyed by field name (``""`` for the whole form)."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def method_preset(blocks: list[str], fdda_centers: str | None) -> str:
    names = [
        ("fdda-fewshot" if b == "fdda" and fdda_centers == "few-shot" else b) for b in BLOCKS if b in blocks
    ]
    return "+".join(names) or "gdfq"


def spec_data(form: dict[str, str], blocks: list[str]) -> dict[str, Any]:
    """The JobSpec dict the form describes (not yet validated). ``form`` holds the last value of
    every field (a ticked checkbox follows its hidden "off", so the last one wins)."""
    errors: dict[str, list[str]] = {}
    data: dict[str, Any] = {
        "method": {"preset": method_preset(blocks, form.get("method.fdda.centers"))},
        "budget": {"preset": form.get("budget.preset") or "cpu"},
        "seed": form.get("seed", "0").strip() or "0",
        "device": form.get("device") or "auto",
        "eval": form.get("eval", "").strip() or None,
    }
    bits = form.get("bits", "").strip()
    try:
        data["quant"] = parse_bits(bits)
    except ValueError as exc:
        errors["bits"] = [str(exc)]
    if form.get("quant.preset"):
        data.setdefault("quant", {})["preset"] = form["quant.preset"]
    if form.get("eval_limit", "").strip():
        data["eval_limit"] = form["eval_limit"].strip()
    for f in all_fields().values():
        block = f.name.split(".")[1] if f.name.startswith("method.") and f.name.count(".") == 2 else None
        if block is not None and block not in blocks:
            continue
        raw = form.get(f.name, "").strip()
        if f.kind == "bool" and f.always:
            value: Any = raw in ("on", "true")
        elif not raw:
            continue
        elif f.kind == "list":
            try:
                value = [int(x) for x in raw.replace(",", " ").split()]
            except ValueError:
                errors[f.name] = ["a list of whole numbers separated by commas, e.g. 10, 15"]
                continue
        else:
            value = raw
        _set(data, f.name, value)
    for block in blocks:
        data["method"].setdefault(block, {})
    extra = form.get("extra", "").strip()
    if extra:
        try:
            more = json.loads(extra)
            if not isinstance(more, dict):
                raise ValueError("must be a JSON object")
            data = _deep_merge(data, more)
        except ValueError as exc:
            errors["extra"] = [f"not a JSON object: {exc}"]
    if errors:
        raise FormErrors(errors)
    return data


def error_field(loc: tuple[Any, ...], names: set[str]) -> str:
    """The form field a pydantic ``loc`` belongs to: the longest known prefix (``""``: the form)."""
    parts = [str(p) for p in loc]
    if parts[:1] == ["quant"] and len(parts) > 1 and parts[1] in BIT_FIELDS:
        return "bits"
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in names:
            return name
    return ""


def validation_errors(exc: ValidationError) -> dict[str, list[str]]:
    names = known_names()
    out: dict[str, list[str]] = {}
    for e in exc.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        loc = (*e["loc"], "preset") if e["type"] == "unknown_preset" else tuple(e["loc"])
        messages = out.setdefault(error_field(loc, names), [])
        if msg not in messages:  # W1A1: w_bits and a_bits say the same thing about one field
            messages.append(msg)
    return out


# ------------------------------------------------------------------------------------ spec -> form


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def form_values(spec: dict[str, Any] | None) -> tuple[dict[str, str], list[str]]:
    """Field values (and ticked blocks) showing ``spec``, a canonical JobSpec: the clone's form."""
    if spec is None:
        return defaults()
    values: dict[str, str] = {}
    for name, f in all_fields().items():
        node: Any = spec
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[name] = _as_text(f.default if node is None and f.always else node)
    q, m = spec.get("quant", {}), spec.get("method", {})
    label = f"W{q.get('w_bits')}A{q.get('a_bits')}"
    if q.get("first_layer_bits") or q.get("last_layer_bits"):
        label += (
            f"-F{q.get('first_layer_bits') or q.get('w_bits')}L{q.get('last_layer_bits') or q.get('w_bits')}"
        )
    values |= {
        "bits": label,
        "quant.preset": str(q.get("preset") or ""),
        "budget.preset": str(spec.get("budget", {}).get("preset") or ""),
        "seed": str(spec.get("seed", 0)),
        "eval": spec.get("eval") or "",
        "eval_limit": _as_text(spec.get("eval_limit")),
        "device": spec.get("device", "auto"),
    }
    return values, [b for b in BLOCKS if m.get(b)]


def defaults() -> tuple[dict[str, str], list[str]]:
    values = {f.name: _as_text(f.default) for f in all_fields().values() if f.always}
    values |= {
        "bits": "W4A4",
        "quant.preset": "",
        "budget.preset": "cpu",
        "seed": "0",
        "eval": "fashion-mnist",
        "device": "auto",
    }
    return values, []


def _preset_values(model: type[BaseModel], section: str, presets: dict[str, dict]) -> dict[str, dict]:
    base = {k: v for k, v in model().model_dump(mode="json").items() if k not in SKIP[section]}
    return {name: {**base, **values} for name, values in presets.items()}


def budget_presets() -> dict[str, dict[str, Any]]:
    """Preset values for the budget placeholders (the page's script shows the chosen preset's)."""
    return _preset_values(BudgetSpec, "budget", BUDGET_PRESETS)


def quant_presets() -> dict[str, dict[str, Any]]:
    """The same for the quantization fields; "" (no preset) shows the reference quantizer's defaults."""
    return _preset_values(QuantSpec, "quant", {"": {}, **QUANT_PRESETS})
