"""The worker's writes survive a real PostgreSQL outage: connections cut by a proxy mid-job are
retried with backoff and every metric point arrives exactly once; an outage longer than the
retry budget fails the write loudly instead of dropping it."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError, ProgrammingError

from dfq.pipeline import Event
from tests.faults import TcpProxy, ack_lost_once
from worker.db import session_scope
from worker.events import Publisher
from worker.models import Checkpoint, Job, JobLog, MetricPoint, User
from worker.progress import JobReporter
from worker.retry import DEFAULT_POLICY, RetryPolicy, is_transient, with_retry


@pytest.fixture
def pg(postgres_url):
    from app.migrate import upgrade

    upgrade(postgres_url)
    proxy, url = TcpProxy.for_url(postgres_url)
    yield postgres_url, proxy, url
    proxy.close()


def _running_job(url: str) -> tuple[str, int]:
    with session_scope(url) as s:
        user = User(name=f"retry-{time.monotonic_ns()}")
        s.add(user)
        s.flush()
        ckpt = Checkpoint(
            owner_id=user.id, name="c", arch="resnet20", state="ready", sha256="0" * 64, size_bytes=1
        )
        s.add(ckpt)
        s.flush()
        job = Job(
            owner_id=user.id, checkpoint_id=ckpt.id, spec={}, total=20, state="running", run_token="tok"
        )
        s.add(job)
        s.flush()
        return job.id, user.id


def _reporter(
    url: str, job_id: str, owner: int, tmp_path, retry: RetryPolicy = DEFAULT_POLICY
) -> JobReporter:
    return JobReporter(
        url, job_id, "tok", owner, Publisher(None), tmp_path, progress_interval_s=0, retry=retry
    )


def step(n: int) -> Event:
    return Event("step", "warmup", n, 20, 0, {"g_loss": 1.0 / n})


def test_progress_writes_ride_out_a_postgres_outage(pg, tmp_path):
    direct, proxy, via_proxy = pg
    job_id, owner = _running_job(direct)
    reporter = _reporter(
        via_proxy, job_id, owner, tmp_path, RetryPolicy(attempts=30, base_delay_s=0.1, max_delay_s=0.5)
    )
    for n in range(1, 6):
        reporter.on_event(step(n))
    proxy.cut()  # the database "restarts": open connections die, new ones are refused

    def more() -> None:
        for n in range(6, 21):
            reporter.on_event(step(n))

    writer = threading.Thread(target=more)
    writer.start()
    time.sleep(2.0)
    assert writer.is_alive(), "the write should be waiting for the database, not done or dropped"
    proxy.restore()
    writer.join(60)
    assert not writer.is_alive()
    with session_scope(direct) as s:
        steps = s.execute(select(MetricPoint.step).where(MetricPoint.job_id == job_id)).scalars().all()
        job = s.get(Job, job_id)
    assert sorted(steps) == list(range(1, 21))  # nothing lost, nothing written twice
    assert job.step == 20 and job.state == "running"


def test_an_outage_longer_than_the_retry_budget_fails_loudly(pg, tmp_path):
    direct, proxy, via_proxy = pg
    job_id, owner = _running_job(direct)
    reporter = _reporter(
        via_proxy, job_id, owner, tmp_path, RetryPolicy(attempts=3, base_delay_s=0.05, max_delay_s=0.1)
    )
    reporter.on_event(step(1))
    proxy.cut()
    with pytest.raises(OperationalError):
        reporter.on_event(step(2))
    assert [p.step for p in reporter.points] == [2]  # still buffered, not silently discarded
    proxy.restore()
    reporter.on_event(step(3))
    with session_scope(direct) as s:
        steps = s.execute(select(MetricPoint.step).where(MetricPoint.job_id == job_id)).scalars().all()
    assert sorted(steps) == [1, 2, 3]


def test_only_connection_errors_are_retried():
    calls = []

    def bad_sql():
        calls.append(1)
        raise ProgrammingError("SELECT nope", {}, Exception("syntax error"))

    with pytest.raises(ProgrammingError):
        with_retry(bad_sql, "test", RetryPolicy(5, 0.01, 0.01), sleep=lambda s: None)
    assert calls == [1]
    assert is_transient(OperationalError("x", {}, Exception("server closed the connection")))
    waits = []
    flaky = iter([OperationalError("x", {}, Exception("down"))] * 2)

    def recovers():
        exc = next(flaky, None)
        if exc:
            raise exc
        return "ok"

    assert with_retry(recovers, "test", RetryPolicy(5, 0.5, 0.75), sleep=waits.append) == "ok"
    assert waits == [0.5, 0.75]  # exponential, capped


def test_a_retried_write_keeps_each_log_line_once_on_postgres(pg, tmp_path, monkeypatch):
    # A log line's identity in a retried batch is its (created_at, message): this checks that the
    # timestamp written reads back equal on PostgreSQL, as the SQLite unit test cannot.
    direct, _, _ = pg
    job_id, owner = _running_job(direct)
    reporter = _reporter(direct, job_id, owner, tmp_path)
    failed = ack_lost_once(monkeypatch, JobLog)
    reporter.log("one line")
    reporter.log("another line")
    reporter.flush()
    assert failed
    with session_scope(direct) as s:
        lines = s.execute(select(JobLog.message).where(JobLog.job_id == job_id).order_by(JobLog.id)).scalars()
        assert list(lines) == ["one line", "another line"]


def test_a_retried_final_write_whose_commit_landed_finishes_the_job_on_postgres(pg, tmp_path, monkeypatch):
    # finish() recognises its own landed write by finished_at: this checks that the comparison holds on
    # PostgreSQL's timestamp type, as the SQLite unit test cannot
    direct, _, _ = pg
    job_id, owner = _running_job(direct)
    reporter = _reporter(direct, job_id, owner, tmp_path)
    failed = ack_lost_once(monkeypatch, JobLog)
    reporter.finish("done", report={"q_top1": 1.0})  # raised LostOwnership before
    assert failed
    with session_scope(direct) as s:
        assert s.get(Job, job_id).state == "done"
        lines = s.execute(select(JobLog.message).where(JobLog.job_id == job_id)).scalars()
        assert list(lines) == ["job done"]
