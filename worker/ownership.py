"""Who runs a job: compare-and-set claims, liveness of the owning attempt, and the reaper.

The job row is the truth. A worker may only run a job it claimed by a conditional UPDATE that
matched the state (and run token) it observed, so two deliveries of the same task never run one
job twice at once. A claimed job records its owner (``host:pid``) and a heartbeat; a job whose
owner is gone (dead pid on this host, or a stale heartbeat) is taken over by the next delivery or
re-queued by the reaper, until ``max_attempts`` runs have started, after which it is failed with a
reason instead of being left ``running`` forever.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from worker.models import TERMINAL_STATES, Job, JobLog, utcnow


def worker_identity() -> str:
    """``host:pid`` of this process, as recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live (non-zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_is_dead(job: Job, stale_after_s: float, now: datetime | None = None) -> bool:
    """Whether the attempt that owns a ``running`` job can no longer make progress."""
    now = now or utcnow()
    if job.heartbeat_at is None or now - job.heartbeat_at > timedelta(seconds=stale_after_s):
        return True
    host, _, pid = (job.worker or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def death_reason(job: Job) -> str:
    where = f"phase {job.phase or 'start'}, step {job.step}/{job.total}"
    return (
        f"the worker running this job died {job.attempts} time(s) ({where}); "
        f"gave up after {job.attempts} of {job.max_attempts} attempts"
    )


@dataclass
class ClaimResult:
    """Outcome of :func:`claim_job`: ``claimed`` (run it), or why not."""

    outcome: str  # claimed | skipped | failed | cancelled
    reason: str = ""
    run_token: str | None = None
    attempt: int = 0
    takeover: bool = False  # the previous attempt died: resume from its saved state


def _cas(session: Session, job: Job, **values: object) -> bool:
    """UPDATE the job only if its state and run token are still what we read."""
    token_cond = Job.run_token.is_(None) if job.run_token is None else Job.run_token == job.run_token
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == job.state, token_cond)
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def log_line(session: Session, job_id: str, message: str, level: str = "info") -> None:
    session.add(JobLog(job_id=job_id, message=message, level=level))


def claim_job(session: Session, job_id: str, stale_after_s: float, token: str | None = None) -> ClaimResult:
    """Take ownership of a job for one attempt, or say why this delivery must not run it.

    ``token`` is the run token this claim writes; a caller that retries the claim passes the same one
    each time, so that a retry after a commit that landed (its acknowledgement lost) finds the job
    already its own and claims it, instead of skipping a job it owns and leaving it to the reaper.
    """
    token = token or uuid.uuid4().hex
    job = session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
    if job is None:
        return ClaimResult("skipped", "no such job")
    if job.state in TERMINAL_STATES:
        return ClaimResult("skipped", f"job is already {job.state}")
    if job.state == "running" and job.run_token == token:
        return ClaimResult("claimed", "this claim had landed", run_token=token, attempt=job.attempts)
    takeover = job.state == "running"
    if takeover and not owner_is_dead(job, stale_after_s):
        return ClaimResult("skipped", f"job is running on {job.worker}")
    now = utcnow()
    if job.cancel_requested:
        if _cas(session, job, state="cancelled", finished_at=now, run_token=None):
            log_line(session, job.id, "cancelled before it ran")
            return ClaimResult("cancelled", "cancel requested")
        return ClaimResult("skipped", "lost a race with another claim")
    if job.attempts >= job.max_attempts:
        reason = death_reason(job)
        if _cas(session, job, state="failed", error=reason, error_phase=job.phase, finished_at=now):
            log_line(session, job.id, reason, "error")
            return ClaimResult("failed", reason)
        return ClaimResult("skipped", "lost a race with another claim")
    attempt = job.attempts + 1
    ok = _cas(
        session,
        job,
        state="running",
        run_token=token,
        worker=worker_identity(),
        heartbeat_at=now,
        attempts=attempt,
        started_at=job.started_at or now,
    )
    if not ok:
        return ClaimResult("skipped", "lost a race with another claim")
    note = f" (the previous attempt on {job.worker} died)" if takeover else ""
    log_line(session, job.id, f"attempt {attempt}/{job.max_attempts} started on {worker_identity()}{note}")
    return ClaimResult("claimed", run_token=token, attempt=attempt, takeover=takeover)


def reap_dead_jobs(session: Session, stale_after_s: float, requeue: Callable[[str], None]) -> list[str]:
    """Re-queue (or fail, or finish cancelling) every ``running`` job whose owner is dead.

    Returns the ids of jobs it changed. ``requeue(job_id)`` sends the task again; it is called after
    the row is back to ``queued``, so a concurrent redelivery and this one cannot both run the job.
    """
    changed = []
    jobs = session.execute(select(Job).where(Job.state == "running")).scalars().all()
    for job in jobs:
        if not owner_is_dead(job, stale_after_s):
            continue
        now = utcnow()
        if job.cancel_requested:
            ok = _cas(session, job, state="cancelled", finished_at=now, run_token=None)
            msg, level = "cancelled (its worker had died)", "info"
        elif job.attempts >= job.max_attempts:
            reason = death_reason(job)
            ok = _cas(session, job, state="failed", error=reason, error_phase=job.phase, finished_at=now)
            msg, level = reason, "error"
        else:
            ok = _cas(session, job, state="queued", run_token=None, worker=None)
            msg, level = f"re-queued: its worker {job.worker} died or stopped responding", "warning"
        if ok:
            log_line(session, job.id, msg, level)
            session.commit()
            changed.append(job.id)
            if msg.startswith("re-queued"):
                requeue(job.id)
    return changed
