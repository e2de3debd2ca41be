"""One attempt at one job: claim it, build the teacher, run the engine, record the outcome.

This is the ``quantize`` task's body. ``dfq.job.run_job`` is the same code path the CLI uses; the
worker adds only ownership (claim, heartbeat), progress reporting and the final state. Because the
job directory holds the engine's resumable ``state.pt``, an attempt that takes over from a dead
one continues from the last pipeline checkpoint rather than starting over.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

from sqlalchemy import select

from worker.config import WorkerSettings
from worker.db import session_scope
from worker.events import Publisher
from worker.models import Checkpoint, Job
from worker.ownership import claim_job
from worker.progress import Heartbeat, JobReporter, LostOwnership
from worker.retry import with_retry

log = logging.getLogger(__name__)
NOT_ARTIFACTS = {"state.pt"}


def job_dir(settings: WorkerSettings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def load_teacher(ckpt: Checkpoint):  # -> tuple[nn.Module, TeacherInfo]
    """The validated checkpoint as the engine's ``(model, TeacherInfo)`` pair."""
    from dfq.models.teachers import load_checkpoint_model

    info_d = ckpt.info or {}
    shape = info_d.get("input_shape")
    model, info = load_checkpoint_model(
        ckpt.path,
        ckpt.arch,
        input_size=tuple(shape[1:]) if shape else None,
        mean=tuple(info_d["mean"]) if info_d.get("mean") else None,
        std=tuple(info_d["std"]) if info_d.get("std") else None,
    )
    info = dataclasses.replace(
        info,
        name=info_d.get("bundled") or ckpt.name,
        classes=list(info_d.get("classes") or []),
        fp_top1=info_d.get("fp_top1"),
        dataset=info_d.get("dataset"),
    )
    return model, info


def run_quantize(job_id: str, settings: WorkerSettings) -> str:
    """Run (or resume) a job if this delivery may; returns what happened, for the task's result."""
    url = settings.resolved_database_url

    token = uuid.uuid4().hex  # one token for every try: a try whose commit landed is recognised

    def claim_it():
        with session_scope(url) as s:
            return claim_job(s, job_id, settings.stale_after_s, token)

    claim = with_retry(claim_it, "claim", settings.retry_policy)
    if claim.outcome != "claimed":
        log.info("job %s not run: %s %s", job_id, claim.outcome, claim.reason)
        return claim.outcome

    def load() -> tuple[Job, Checkpoint]:
        with session_scope(url) as s:
            job = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
            ckpt = s.get(Checkpoint, job.checkpoint_id)
            s.expunge_all()
            return job, ckpt

    job, ckpt = with_retry(load, "load job", settings.retry_policy)
    out = job_dir(settings, job_id)
    reporter = JobReporter(
        url,
        job_id,
        claim.run_token,
        job.owner_id,
        Publisher(settings.resolved_redis_url),
        out,
        settings.progress_interval_s,
        settings.publish_interval_s,
        settings.cancel_poll_s,
        retry=settings.retry_policy,
    )
    with Heartbeat(url, job_id, claim.run_token, settings.heartbeat_s):
        return _attempt(job, ckpt, out, reporter)


def _attempt(job: Job, ckpt: Checkpoint, out: Path, reporter: JobReporter) -> str:
    from dfq.job import run_job
    from dfq.pipeline import Cancelled
    from dfq.spec import JobSpec

    try:
        spec = JobSpec.model_validate(job.spec)
        teacher = load_teacher(ckpt)
        report = run_job(spec, teacher, out, reporter.on_event, reporter.should_cancel)
        reporter.register_files(out, NOT_ARTIFACTS)
        reporter.finish("done", report=report, error=None, error_phase=None)
        return "done"
    except Cancelled as exc:
        reporter.register_files(out, NOT_ARTIFACTS, partial=True)  # kept, marked partial
        reporter.finish("cancelled", error=None, error_phase=None)
        log.info("job %s: %s", job.id, exc)
        return "cancelled"
    except LostOwnership as exc:
        log.warning("%s", exc)
        return "lost"
    except Exception as exc:
        phase = reporter.row.get("phase") or "setup"
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
        log.exception("job %s failed in phase %s", job.id, phase)
        try:
            reporter.finish("failed", error=message, error_phase=phase)
        except LostOwnership:
            return "lost"
        return "failed"
