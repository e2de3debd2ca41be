"""What the pages show about jobs: one summary row per job, and the result tables of a finished one.

Kept apart from the route handlers so the list, the job page and the compare page describe a job
the same way (method, bits, accuracy) and so it can be tested without a server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.models import TERMINAL_STATES, Job

STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass
class JobRow:
    """A job as the jobs list and the compare table show it."""

    job: Job
    owner: str
    teacher: str

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def method(self) -> str:
        m = self.job.spec.get("method", {})
        return m.get("preset") or "custom"

    @property
    def bits(self) -> str:
        q = self.job.spec.get("quant", {})
        label = f"W{q.get('w_bits')}A{q.get('a_bits')}"
        first, last = q.get("first_layer_bits"), q.get("last_layer_bits")
        return label + (f"-F{first or q.get('w_bits')}L{last or q.get('w_bits')}" if first or last else "")

    @property
    def budget(self) -> str:
        return self.job.spec.get("budget", {}).get("preset") or "custom"

    @property
    def seed(self) -> int:
        return self.job.spec.get("seed", 0)

    @property
    def active(self) -> bool:
        return self.job.state not in TERMINAL_STATES

    @property
    def percent(self) -> float:
        j = self.job
        if j.state == "done":
            return 100.0
        return round(100.0 * j.step / j.total, 1) if j.total else 0.0

    @property
    def report(self) -> dict[str, Any]:
        return self.job.report or {}

    @property
    def accuracy(self) -> tuple[float | None, str]:
        """Quantized top-1 on real labels, else agreement on synthetic images (and which it is)."""
        r = self.report
        if r.get("q_top1") is not None:
            return r["q_top1"], "top-1"
        if r.get("agreement_synthetic") is not None:
            return r["agreement_synthetic"], "agreement (synthetic)"
        return None, ""

    def matches(self, method: str, bits: str, text: str) -> bool:
        """Filters of the jobs list: method and bits contain the text given (case-insensitive)."""
        hay = f"{self.id} {self.teacher} {self.method} {self.bits}".lower()
        return (
            method.lower() in self.method.lower()
            and bits.lower() in self.bits.lower()
            and all(word in hay for word in text.lower().split())
        )


def accuracy_table(report: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(what, value, note) rows of the accuracy/agreement table of a finished job."""
    rows: list[tuple[str, Any, str]] = []
    n = report.get("n_eval")
    where = f"{report.get('eval_set', '')}, {n} images" if n else ""
    if report.get("fp_top1") is not None:
        rows.append(("teacher (full precision) top-1 %", report["fp_top1"], where))
    if report.get("q_top1") is not None:
        rows.append((f"student ({report.get('bits', '')}) top-1 %", report["q_top1"], where))
        if report.get("fp_top1") is not None:
            rows.append(("drop (points)", round(report["fp_top1"] - report["q_top1"], 2), ""))
    if report.get("agreement") is not None:
        rows.append(("teacher-student agreement %", report["agreement"], "same arg-max on real images"))
    if report.get("agreement_synthetic") is not None:
        rows.append(
            ("agreement on synthetic images %", report["agreement_synthetic"], "no labelled set given")
        )
    best = report.get("best_epoch")
    if best:
        rows.append(
            (
                "best per-epoch student top-1 %",
                best.get("q_top1"),
                f"epoch {best.get('epoch')}, test-set selection",
            )
        )
    return rows


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer weight error with a bar length relative to the worst layer."""
    rows = report.get("layer_errors") or []
    worst = max((r.get("rel_mse") or 0.0 for r in rows), default=0.0) or 1.0
    return [{**r, "bar": round(100.0 * (r.get("rel_mse") or 0.0) / worst, 1)} for r in rows]


def attention_summary(job_dir: Path, classes: list[str]) -> dict[str, Any] | None:
    """The final attention figure's numbers, with per-class means (rows of the figure)."""
    path = job_dir / "attention.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    per_row = max(int(data.get("per_row") or 1), 1)
    tv = data.get("tv") or []
    rows = []
    for i in range(0, len(tv), per_row):
        k = i // per_row
        chunk = tv[i : i + per_row]
        rows.append(
            {"class": classes[k] if k < len(classes) else f"class {k}", "tv": sum(chunk) / len(chunk)}
        )
    return {**data, "rows": rows}


def teacher_classes(report: dict[str, Any], checkpoint_info: dict[str, Any] | None) -> list[str]:
    teacher = report.get("teacher") or {}
    classes = teacher.get("classes") or (checkpoint_info or {}).get("classes") or []
    n = teacher.get("num_classes") or (checkpoint_info or {}).get("num_classes") or len(classes)
    return list(classes)[:10] or [f"class {i}" for i in range(min(int(n or 10), 10))]
