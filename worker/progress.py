"""Turning engine events into database rows and published events, throttled.

A job may run tens of thousands of iterations; writing every one as it happens would make the
database the bottleneck. Step metrics are buffered and written together at most every
``progress_interval_s``; phases, evaluations, sample grids and checkpoints are written at once.
Every write is conditioned on this attempt's run token: if the job was taken over (this attempt
was presumed dead), the write matches nothing and the attempt stops with :class:`LostOwnership`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, tuple_, update

from worker.db import session_scope
from worker.events import Publisher
from worker.models import Artifact, Job, JobLog, MetricPoint, utcnow
from worker.retry import DEFAULT_POLICY, RetryPolicy, with_retry


class LostOwnership(Exception):
    """Another attempt owns the job now; this one must stop without writing a final state."""


def artifact_kind(name: str) -> str:
    """What a file in a job directory is, for listings and the dashboard."""
    if name.startswith("samples"):
        return "samples"
    if name.startswith("attention"):
        return "attention"
    return {
        "quantized.safetensors": "quantized",
        "generator.safetensors": "generator",
        "report.json": "report",
        "report.md": "report",
        "metrics.jsonl": "metrics",
        "model.qdq.onnx": "onnx",
        "quantized.packed.safetensors": "packed",
        "model.pt2": "torch-export",
    }.get(name, "other")


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None: JSON (and PostgreSQL's json type) has no
    such numbers, and a diverging loss must not make the job's progress unwritable."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def eta_seconds(step: int, total: int, rate: float | None) -> float | None:
    """Seconds left at the current attempt's pace (None before a pace is known)."""
    if not rate or rate <= 0 or total <= 0:
        return None
    return round(max(total - step, 0) / rate, 1)


def _copy(row: Any) -> Any:
    """A fresh ORM object with ``row``'s column values: the buffered rows are never added to a
    session themselves, so a write that rolled back can be retried with untouched copies."""
    cls = type(row)
    return cls(**{c.key: row.__dict__[c.key] for c in cls.__table__.columns if c.key in row.__dict__})


class JobReporter:
    """The engine's ``on_event`` and ``should_cancel`` for one attempt of one job."""

    def __init__(
        self,
        db_url: str,
        job_id: str,
        run_token: str,
        owner_id: int,
        publisher: Publisher,
        out_dir: Path,
        progress_interval_s: float = 1.0,
        publish_interval_s: float = 0.2,
        cancel_poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        retry: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        self.db_url, self.job_id, self.run_token, self.owner_id = db_url, job_id, run_token, owner_id
        self.publisher, self.out_dir = publisher, out_dir
        self.progress_interval_s, self.publish_interval_s = progress_interval_s, publish_interval_s
        self.cancel_poll_s, self.clock, self.retry = cancel_poll_s, clock, retry
        self.points: list[MetricPoint] = []
        self.logs: list[JobLog] = []
        self.artifacts: list[tuple[str, int, bool]] = []
        self.row: dict[str, Any] = {}
        self.first_step: int | None = None
        self.t_first = 0.0
        self.last_flush = self.last_publish = self.last_cancel_check = -1e18
        self.cancel_seen = False
        self.writes = 0

    # ------------------------------------------------------------------------------ engine hooks

    def on_event(self, event: Any) -> None:
        """Record one :class:`dfq.pipeline.Event`; flush and publish when due."""
        now = self.clock()
        if self.first_step is None:
            self.first_step, self.t_first = event.step, now
            self._trim_after(event.step)
        self.row.update(phase=event.phase, step=event.step, total=event.total, epoch=event.epoch)
        if event.step > self.first_step:
            self.row["rate"] = round((event.step - self.first_step) / max(now - self.t_first, 1e-9), 4)
        payload: dict[str, Any] = {"phase": event.phase, "step": event.step, "total": event.total}
        if event.kind == "step":
            metrics = json_safe({k: float(v) for k, v in event.metrics.items()})
            self.row["metrics"] = metrics
            self.points.append(
                MetricPoint(
                    job_id=self.job_id, kind="step", step=event.step, epoch=event.epoch, values=metrics
                )
            )
            payload["metrics"] = metrics
        elif event.kind == "eval":
            values = json_safe({k: float(v) for k, v in event.metrics.items()})
            self.points.append(
                MetricPoint(
                    job_id=self.job_id, kind="eval", step=event.step, epoch=event.epoch, values=values
                )
            )
            payload["metrics"] = values
            self.log(f"evaluation at step {event.step}: {values}")
        elif event.kind == "phase":
            self.log(f"phase {event.phase} from step {event.step}/{event.total}")
        elif event.kind == "samples":
            name = f"samples/step_{event.step:06d}.png"
            path = self.out_dir / name
            self.artifacts.append((name, path.stat().st_size if path.exists() else 0, False))
            payload["artifact"] = name
            # the engine's teacher-vs-student attention figure of the same samples, when it made one
            for extra in (f"attention/step_{event.step:06d}.png", f"attention/step_{event.step:06d}.json"):
                if (self.out_dir / extra).exists():
                    self.artifacts.append((extra, (self.out_dir / extra).stat().st_size, False))
                    payload.setdefault("attention", extra)
        payload["eta_s"] = eta_seconds(event.step, event.total, self.row.get("rate"))
        urgent = event.kind != "step"
        if urgent or now - self.last_flush >= self.progress_interval_s:
            self.flush(now)
        if urgent or now - self.last_publish >= self.publish_interval_s:
            self.last_publish = now
            self.publisher.publish(self.job_id, event.kind, {"state": "running", **payload})

    def should_cancel(self) -> bool:
        """The job row's cancel flag, read at most every ``cancel_poll_s``."""
        now = self.clock()
        if not self.cancel_seen and now - self.last_cancel_check >= self.cancel_poll_s:
            self.last_cancel_check = now

            def read() -> bool:
                with session_scope(self.db_url) as s:
                    return s.execute(select(Job.cancel_requested).where(Job.id == self.job_id)).scalar_one()

            self.cancel_seen = bool(with_retry(read, "cancel flag", self.retry))
        return self.cancel_seen

    # ------------------------------------------------------------------------------ writes

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append(self._log_row(message, level))

    def _log_row(self, message: str, level: str) -> JobLog:
        # stamped now, not at insert: (created_at, message) is then the line's identity, the same in
        # every retry of its batch, so a retry after a commit that landed replaces it instead of
        # writing it twice
        return JobLog(job_id=self.job_id, message=message, level=level, created_at=utcnow())

    def _trim_after(self, step: int) -> None:
        """A resumed attempt re-runs the steps after its checkpoint: drop their old points."""

        def trim() -> None:
            with session_scope(self.db_url) as s:
                s.execute(
                    delete(MetricPoint).where(MetricPoint.job_id == self.job_id, MetricPoint.step > step)
                )

        with_retry(trim, "trim metrics", self.retry)
        if step:
            self.log(f"resuming from the saved state at step {step}")

    def flush(self, now: float | None = None, **final: Any) -> None:
        """Write the buffered progress in one transaction, if this attempt still owns the job."""
        self.last_flush = self.clock() if now is None else now
        values = {**self.row, **final, "heartbeat_at": utcnow(), "updated_at": utcnow()}

        def write() -> None:  # one transaction, and idempotent: a retry may follow a commit that landed
            with session_scope(self.db_url) as s:
                result = s.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.run_token == self.run_token, Job.state == "running")
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount != 1:
                    if self._final_write_landed(s, values):
                        return  # its rows went in with it; writing them again would repeat them
                    raise LostOwnership(f"job {self.job_id} is no longer owned by this attempt")
                # a retried batch replaces its rows, not repeats them: a point is identified by (kind,
                # step), a log line by (created_at, message) (see _log_row)
                self._delete_batch(s, MetricPoint, ("kind", "step"), self.points)
                self._delete_batch(s, JobLog, ("created_at", "message"), self.logs)
                s.add_all([_copy(row) for row in self.points + self.logs])
                for name, size, partial in self.artifacts:
                    self._upsert_artifact(s, name, size, partial)

        with_retry(write, "progress", self.retry)
        self.points, self.logs, self.artifacts = [], [], []
        self.writes += 1

    def _final_write_landed(self, s: Any, values: dict[str, Any]) -> bool:
        """Whether the row already holds this very final write: a retry of ``finish`` after a COMMIT
        that landed finds the job no longer ``running``, yet the job is finished by this attempt and
        must not end as lost ownership (no last ``state`` event, a ``lost`` outcome). ``finished_at``
        is stamped once per final write, so a reaper's or another attempt's ending never matches; a write
        without it is a progress write, never a final one."""
        if values.get("finished_at") is None:
            return False
        mine = select(Job.id).where(  # compared in SQL, as the stored timestamp's type is the database's
            Job.id == self.job_id,
            Job.state == values.get("state"),
            Job.run_token == self.run_token,
            Job.finished_at == values["finished_at"],
        )
        return s.execute(mine).first() is not None

    def _delete_batch(self, s: Any, table: type, key: tuple[str, ...], rows: list) -> None:
        """Delete this job's rows of ``table`` whose ``key`` columns equal one of ``rows``'."""
        if rows:
            columns = tuple_(*(getattr(table, c) for c in key))
            keys = {tuple(getattr(row, c) for c in key) for row in rows}
            s.execute(delete(table).where(table.job_id == self.job_id, columns.in_(keys)))

    def _upsert_artifact(self, s: Any, name: str, size: int, partial: bool = False) -> None:
        existing = s.execute(
            select(Artifact).where(Artifact.job_id == self.job_id, Artifact.name == name)
        ).scalar_one_or_none()
        if existing is None:
            s.add(
                Artifact(
                    job_id=self.job_id,
                    owner_id=self.owner_id,
                    name=name,
                    kind=artifact_kind(name),
                    size_bytes=size,
                    partial=partial,
                )
            )
        else:
            existing.size_bytes, existing.partial = size, partial

    def register_files(self, out_dir: Path, skip: set[str], partial: bool = False) -> None:
        """Queue every file of the job directory (but ``skip``) as an artifact; ``partial`` marks
        what a cancelled run left (metrics and samples so far, no final model)."""
        for path in sorted(out_dir.rglob("*")):
            name = path.relative_to(out_dir).as_posix()
            if path.is_file() and name not in skip and not name.endswith(".tmp"):
                self.artifacts.append((name, path.stat().st_size, partial))

    def finish(self, state: str, **values: Any) -> None:
        """Write the final state (done, failed or cancelled) and tell subscribers.

        If the buffered progress cannot be written (a database error), it is dropped and the final
        state is written alone: a job must never stay ``running`` because its last metrics were bad.
        """
        values = json_safe(values)
        level = "error" if state == "failed" else "info"
        self.log(f"job {state}" + (f": {values['error']}" if values.get("error") else ""), level)
        try:
            self.flush(state=state, finished_at=utcnow(), **values)
        except LostOwnership:
            raise
        except Exception as exc:
            self.points, self.artifacts, self.row = [], [], {}
            self.logs = [self._log_row(f"could not record progress: {exc}", "error")]
            if state == "done":
                state, values = (
                    "failed",
                    {"error": f"could not record the result: {exc}", "error_phase": "finish"},
                )
            self.flush(
                state=state, finished_at=utcnow(), **{k: v for k, v in values.items() if k != "report"}
            )
        self.publisher.publish(
            self.job_id,
            "state",
            {
                "state": state,
                "phase": self.row.get("phase"),
                "step": self.row.get("step"),
                "error": values.get("error"),
            },
        )


class Heartbeat:
    """A daemon thread that refreshes the job's heartbeat while a (possibly long) step runs."""

    def __init__(self, db_url: str, job_id: str, run_token: str, interval_s: float) -> None:
        self.db_url, self.job_id, self.run_token, self.interval_s = db_url, job_id, run_token, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with session_scope(self.db_url) as s:
                    s.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.run_token == self.run_token, Job.state == "running")
                        .values(heartbeat_at=utcnow())
                        .execution_options(synchronize_session=False)
                    )
            except Exception:  # a transient DB error must not kill the run; the next beat retries
                continue
