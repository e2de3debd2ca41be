"""The jobs list (filters, auto-refreshed rows), the job page, cancel, and the compare page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.jobs import cancel_job, job_out, owned_job
from app.auth import Principal
from app.web.render import check_csrf, render, require_login
from app.web.views import (
    STATES,
    JobRow,
    accuracy_table,
    attention_summary,
    layer_rows,
    teacher_classes,
)
from worker.models import Artifact, Checkpoint, Job, JobLog, User

router = APIRouter(include_in_schema=False)
SCAN_LIMIT = 500  # the list filters method/bits/text over this many newest jobs
SHOW_LIMIT = 100
COMPARE_MAX = 6


def _rows(session: Session, principal: Principal, jobs: list[Job]) -> list[JobRow]:
    owner = session.get(User, principal.user_id)
    ckpt_ids = {j.checkpoint_id for j in jobs}
    names: dict[str, str] = {}
    if ckpt_ids:
        rows = session.execute(select(Checkpoint.id, Checkpoint.name).where(Checkpoint.id.in_(ckpt_ids)))
        names = {cid: name for cid, name in rows}
    return [JobRow(j, owner.name if owner else "", names.get(j.checkpoint_id, "")) for j in jobs]


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> Response:
    return RedirectResponse("/jobs", status_code=303)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_list(
    request: Request,
    state: Annotated[list[str] | None, Query()] = None,
    method: str = "",
    bits: str = "",
    q: str = "",
    fragment: str = "",
) -> Response:
    """Newest first. ``fragment=rows`` answers only the table body, which the page's script
    swaps in every few seconds (server-rendered, so escaping stays in one place)."""
    principal = require_login(request)
    states = [s for s in state or [] if s in STATES]
    with request.app.state.sessions() as session:
        query = select(Job).where(Job.owner_id == principal.user_id)
        if states:
            query = query.where(Job.state.in_(states))
        jobs = list(
            session.execute(query.order_by(Job.created_at.desc(), Job.id).limit(SCAN_LIMIT)).scalars()
        )
        rows = [r for r in _rows(session, principal, jobs) if r.matches(method, bits, q)]
    context = {
        "rows": rows[:SHOW_LIMIT],
        "matched": len(rows),
        "scanned": len(jobs),
        "scan_limit": SCAN_LIMIT,
        "filters": {"state": states, "method": method, "bits": bits, "q": q},
        "states": STATES,
        "any_active": any(r.active for r in rows[:SHOW_LIMIT]),
        "nav": "jobs",
    }
    return render(request, "jobs_rows.html" if fragment == "rows" else "jobs.html", context)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> Response:
    principal = require_login(request)
    settings = request.app.state.settings
    with request.app.state.sessions() as session:
        job = owned_job(session, principal, job_id)
        row = _rows(session, principal, [job])[0]
        ckpt = session.get(Checkpoint, job.checkpoint_id)
        report = job.report or {}
        classes = teacher_classes(report, ckpt.info if ckpt else None)
        context = {
            "row": row,
            "job": job_out(job),
            "report": report,
            "accuracy": accuracy_table(report),
            "evals": report.get("evals") or [],
            "layers": layer_rows(report),
            "attention": attention_summary(settings.jobs_dir / job.id, classes),
            "classes": classes,
            "checkpoint": ckpt,
            "logs": _logs(session, job.id),
            "nav": "jobs",
        }
        arts = _artifacts(request, session, job.id)
    context |= {
        "artifacts": arts,
        "artifacts_json": [{"name": a["name"], "kind": a["kind"], "url": a["url"]} for a in arts],
        "sample_count": sum(a["name"].startswith("samples/") for a in arts),
    }
    return render(request, "job.html", context)


def size_label(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _artifacts(request: Request, session: Session, job_id: str) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
    ).scalars()
    return [
        {
            "name": a.name,
            "kind": a.kind,
            "url": str(request.url_for("download_artifact", job_id=job_id, name=a.name).path),
            "size_label": size_label(a.size_bytes),
        }
        for a in rows
    ]


def _logs(session: Session, job_id: str, limit: int = 300) -> list[JobLog]:
    rows = session.execute(
        select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).limit(limit)
    ).scalars()
    return list(reversed(list(rows)))


@router.post("/ui/jobs/{job_id}/cancel")
def cancel(request: Request, job_id: str, csrf_token: Annotated[str, Form()] = "") -> Response:
    principal = require_login(request)
    check_csrf(request, csrf_token)
    with request.app.state.sessions() as session:
        try:
            cancel_job(job_id, principal, session)
        except HTTPException as exc:
            if exc.status_code != 409:  # already finished: nothing to do, show the page
                raise
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/compare", response_class=HTMLResponse)
def compare(request: Request, ids: Annotated[list[str] | None, Query()] = None) -> Response:
    """Several jobs side by side: final numbers, overlaid curves (script), sample grids."""
    principal = require_login(request)
    settings = request.app.state.settings
    wanted = list(dict.fromkeys(ids or []))[:COMPARE_MAX]
    with request.app.state.sessions() as session:
        jobs = [owned_job(session, principal, i) for i in wanted]
        rows = _rows(session, principal, jobs)
        recent = _rows(
            session,
            principal,
            list(
                session.execute(
                    select(Job)
                    .where(Job.owner_id == principal.user_id)
                    .order_by(Job.created_at.desc())
                    .limit(30)
                ).scalars()
            ),
        )
        attention, latest = {}, {}
        for r in rows:
            latest[r.id] = session.execute(
                select(Artifact.name)
                .where(Artifact.job_id == r.id, Artifact.name.like("samples/step_%"))
                .order_by(Artifact.name.desc())
                .limit(1)
            ).scalar_one_or_none()
            ckpt = session.get(Checkpoint, r.job.checkpoint_id)
            attention[r.id] = attention_summary(
                settings.jobs_dir / r.id, teacher_classes(r.report, ckpt.info if ckpt else None)
            )
    series = [{"id": r.id, "label": f"{r.id[:8]} {r.method} {r.bits}"} for r in rows]
    context = {
        "rows": rows, "recent": recent, "attention": attention, "series": series, "latest": latest,
        "compare_max": COMPARE_MAX, "nav": "compare",
    }  # fmt: skip
    return render(request, "compare.html", context)
