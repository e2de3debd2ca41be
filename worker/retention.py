"""Retention: remove what a long-running shared server would otherwise keep forever.

After ``retention_days`` (counted from ``finished_at``) the files and artifact rows of a finished
job are deleted, unless the job is pinned; the job row, its metrics and its logs stay (they are
small, and the history of what ran is worth keeping), with ``artifacts_expired_at`` set and a log
line saying why the files are gone. Rejected uploads are deleted after the same period: nobody
can use them, and their error message has been readable for all that time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from worker.models import TERMINAL_STATES, Artifact, Checkpoint, Job, JobLog, utcnow


@dataclass
class RetentionResult:
    jobs: list[str] = field(default_factory=list)  # jobs whose artifacts were removed
    checkpoints: list[str] = field(default_factory=list)  # rejected uploads deleted


def apply_retention(
    session: Session, jobs_dir: Path, checkpoints_dir: Path, days: float, now: datetime | None = None
) -> RetentionResult:
    """One pass of the policy; ``days`` 0 keeps everything. Commits per item, so a crash mid-pass
    leaves every job either untouched or fully expired."""
    result = RetentionResult()
    if days <= 0:
        return result
    cutoff = (now or utcnow()) - timedelta(days=days)
    expired = session.execute(
        select(Job).where(
            Job.state.in_(TERMINAL_STATES),
            Job.pinned.is_(False),
            Job.artifacts_expired_at.is_(None),
            Job.finished_at < cutoff,
        )
    ).scalars()
    for job in list(expired):
        session.execute(delete(Artifact).where(Artifact.job_id == job.id))
        job.artifacts_expired_at = utcnow()
        session.add(
            JobLog(job_id=job.id, message=f"artifacts removed by the retention policy ({days:g} days)")
        )
        session.commit()
        shutil.rmtree(jobs_dir / job.id, ignore_errors=True)
        result.jobs.append(job.id)
    rejected = session.execute(
        select(Checkpoint).where(Checkpoint.state == "rejected", Checkpoint.updated_at < cutoff)
    ).scalars()
    for ckpt in list(rejected):
        session.delete(ckpt)
        session.commit()
        shutil.rmtree(checkpoints_dir / ckpt.id, ignore_errors=True)
        result.checkpoints.append(ckpt.id)
    return result
