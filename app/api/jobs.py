"""Jobs: create from a JobSpec (validated before anything is queued), list, get, cancel, clone,
delete, logs and the metrics time series."""

from __future__ import annotations

import shutil
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.auth import Principal
from app.deps import PrincipalDep, SessionDep, SettingsDep
from app.overrides import merge_overrides
from app.owned import owned
from app.quota import quota_exceeded
from app.ratelimit import RateLimited
from app.schemas import DB_INT_MAX, HEADLINE_KEYS, JobClone, JobCreate, JobOut, LogLine, MetricPointOut, Page
from dfq.spec import JobSpec
from worker.celery_app import QUANTIZE_TASK
from worker.models import JOB_STATES, TERMINAL_STATES, Checkpoint, Job, JobLog, MetricPoint, new_id, utcnow
from worker.progress import eta_seconds

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])


def field_error(loc: list[str | int], msg: str) -> HTTPException:
    """A 422 in FastAPI's own field-level shape."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": loc, "msg": msg, "type": "value_error"}]
    )


def job_out(job: Job) -> JobOut:
    report = job.report or None
    return JobOut(
        id=job.id, state=job.state, phase=job.phase, step=job.step, total=job.total,
        eta_s=eta_seconds(job.step, job.total, job.rate) if job.state == "running" else None,
        metrics=job.metrics or {}, error=job.error, error_phase=job.error_phase, attempts=job.attempts,
        max_attempts=job.max_attempts, cancel_requested=job.cancel_requested, worker=job.worker,
        checkpoint_id=job.checkpoint_id,
        cloned_from=job.cloned_from, spec=job.spec,
        result={k: report[k] for k in HEADLINE_KEYS if k in report} if report else None,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        pinned=bool(job.pinned), artifacts_expired_at=job.artifacts_expired_at,
    )  # fmt: skip


def owned_job(session: Session, principal: Principal, job_id: str) -> Job:
    return owned(session, principal, Job, job_id, "job")


def ready_checkpoint(session: Session, principal: Principal, checkpoint_id: str) -> Checkpoint:
    c = session.get(Checkpoint, checkpoint_id)
    if c is None or c.owner_id != principal.user_id:
        raise field_error(["body", "checkpoint_id"], f"no checkpoint {checkpoint_id!r}")
    if c.state != "ready":
        why = (
            "is still pending intake; retry when it is ready"
            if c.state == "pending"
            else f"was rejected: {c.error}"
        )
        raise field_error(["body", "checkpoint_id"], f"checkpoint {checkpoint_id} {why}")
    return c


def enqueue(
    request: Request,
    session: Session,
    principal: Principal,
    spec: JobSpec,
    ckpt: Checkpoint,
    cloned_from: str | None = None,
) -> Job:
    """Insert the ``queued`` row, then send the task; if the broker is down, nothing is kept (503).
    Over the per-token submission limit: 429 with ``Retry-After``, nothing inserted."""
    settings = request.app.state.settings
    limiter = request.app.state.submit_limiter
    key = f"token:{principal.token_id}" if principal.token_id is not None else f"user:{principal.user_id}"
    try:
        limiter.hit(key)
    except RateLimited as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    over = quota_exceeded(session, principal.user_id, settings.user_quota_bytes)
    if over:
        raise HTTPException(status.HTTP_403_FORBIDDEN, over)
    job = Job(
        id=new_id(), owner_id=principal.user_id, checkpoint_id=ckpt.id, spec=spec.canonical(), state="queued",
        total=spec.budget.total_iters, max_attempts=settings.max_attempts, cloned_from=cloned_from,
    )  # fmt: skip
    session.add(job)
    session.add(JobLog(job_id=job.id, message=f"queued: {spec.summary()}"))
    session.commit()
    try:
        request.app.state.celery.send_task(
            QUANTIZE_TASK, args=[job.id], retry=True, retry_policy={"max_retries": 2}
        )
    except Exception as exc:
        session.delete(job)
        session.commit()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"broker unavailable, job not created: {exc}"
        ) from None
    return job


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def create_job(body: JobCreate, request: Request, principal: PrincipalDep, session: SessionDep):
    """Start a job. The spec was validated by the time this runs (422 otherwise), and the
    checkpoint must be yours and ``ready``."""
    ckpt = ready_checkpoint(session, principal, body.checkpoint_id)
    return job_out(enqueue(request, session, principal, body.spec, ckpt))


@router.get("", response_model=Page[JobOut])
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    state: Annotated[list[str] | None, Query(description="filter; repeat for several states")] = None,
    checkpoint_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=DB_INT_MAX)] = 50,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
):
    """Your jobs, newest first."""
    bad = [s for s in state or [] if s not in JOB_STATES]
    if bad:
        raise field_error(["query", "state"], f"unknown state {bad[0]!r}; one of {', '.join(JOB_STATES)}")
    limit = min(limit, settings.page_size_max)
    q = select(Job).where(Job.owner_id == principal.user_id)
    if state:
        q = q.where(Job.state.in_(state))
    if checkpoint_id:
        q = q.where(Job.checkpoint_id == checkpoint_id)
    total = session.execute(select(func.count()).select_from(q.subquery())).scalar_one()
    rows = session.execute(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).scalars()
    return Page[JobOut](items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, principal: PrincipalDep, session: SessionDep):
    """State, phase, step/total, ETA, latest metrics, and the error with its phase."""
    return job_out(owned_job(session, principal, job_id))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep):
    """A queued job is cancelled at once; a running one stops at its next step (state saved)."""
    job = owned_job(session, principal, job_id)
    if job.state in TERMINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is already {job.state}")
    now = utcnow()
    done = session.execute(
        update(Job).where(Job.id == job.id, Job.state == "queued")
        .values(state="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    ).rowcount  # fmt: skip
    if not done:
        session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True, updated_at=now))
    session.add(JobLog(job_id=job.id, message="cancelled while queued" if done else "cancel requested"))
    session.commit()
    session.refresh(job)
    return job_out(job)


@router.post("/{job_id}/pin", response_model=JobOut)
def pin_job(job_id: str, principal: PrincipalDep, session: SessionDep):
    """Keep this job's artifacts past the retention period (DFQ_RETENTION_DAYS)."""
    return _set_pinned(session, principal, job_id, True)


@router.post("/{job_id}/unpin", response_model=JobOut)
def unpin_job(job_id: str, principal: PrincipalDep, session: SessionDep):
    """Let the retention policy remove this job's artifacts once they are old enough."""
    return _set_pinned(session, principal, job_id, False)


def _set_pinned(session: Session, principal: Principal, job_id: str, pinned: bool) -> JobOut:
    job = owned_job(session, principal, job_id)
    job.pinned = pinned
    session.add(JobLog(job_id=job.id, message="pinned" if pinned else "unpinned"))
    session.commit()
    session.refresh(job)
    return job_out(job)


@router.post("/{job_id}/clone", status_code=status.HTTP_201_CREATED, response_model=JobOut)
def clone_job(job_id: str, body: JobClone, request: Request, principal: PrincipalDep, session: SessionDep):
    """A new job with the original's spec and ``overrides`` merged in (shorthand accepted)."""
    original = owned_job(session, principal, job_id)
    try:
        spec = JobSpec.model_validate(merge_overrides(original.spec, body.overrides))
    except ValidationError as exc:
        detail = [
            {**e, "loc": ["body", "overrides", *e["loc"]], "ctx": None} for e in exc.errors(include_url=False)
        ]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
    except ValueError as exc:
        raise field_error(["body", "overrides"], str(exc)) from None
    ckpt = ready_checkpoint(session, principal, body.checkpoint_id or original.checkpoint_id)
    return job_out(enqueue(request, session, principal, spec, ckpt, cloned_from=original.id))


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_job(job_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep):
    """Delete a finished job with its metrics and artifacts (409 while queued or running)."""
    job = owned_job(session, principal, job_id)
    if job.state not in TERMINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {job.state}; cancel it first")
    session.delete(job)
    session.commit()
    shutil.rmtree(settings.jobs_dir / job.id, ignore_errors=True)


@router.get("/{job_id}/logs", response_model=list[LogLine])
def job_logs(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=-DB_INT_MAX, le=DB_INT_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
):
    """What happened to the job (attempts, phases, evaluations, errors); ``after`` pages by id."""
    owned_job(session, principal, job_id)
    rows = session.execute(
        select(JobLog).where(JobLog.job_id == job_id, JobLog.id > after).order_by(JobLog.id).limit(limit)
    ).scalars()
    return [LogLine(id=r.id, time=r.created_at, level=r.level, message=r.message) for r in rows]


@router.get("/{job_id}/metrics", response_model=list[MetricPointOut])
def job_metrics(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    kind: Annotated[str | None, Query(description="step | eval")] = None,
    after_step: Annotated[int, Query(ge=-DB_INT_MAX, le=DB_INT_MAX)] = -1,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    stride: Annotated[
        int,
        Query(ge=1, le=DB_INT_MAX, description="only steps divisible by this (thins long runs for charts)"),
    ] = 1,
):
    """The time series of every logged loss and diagnostic (``kind=step``) and evaluation (``eval``)."""
    owned_job(session, principal, job_id)
    q = select(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.step > after_step)
    if kind:
        q = q.where(MetricPoint.kind == kind)
    if stride > 1:
        q = q.where(MetricPoint.step % stride == 0)
    rows = session.execute(q.order_by(MetricPoint.step, MetricPoint.id).limit(limit)).scalars()
    return [_point(r) for r in rows]


def _point(r: MetricPoint) -> MetricPointOut:
    values: dict[str, Any] = {k: v for k, v in r.values.items() if v is None or isinstance(v, int | float)}
    return MetricPointOut(step=r.step, epoch=r.epoch, kind=r.kind, time=r.created_at, values=values)
