"""Claims, take-overs, attempt limits and the reaper, against a real (SQLite) database."""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

from worker.db import session_scope
from worker.models import Job, JobLog, utcnow
from worker.ownership import claim_job, owner_is_dead, pid_alive, reap_dead_jobs, worker_identity


def _job(url, job_id) -> Job:
    with session_scope(url) as s:
        return s.get(Job, job_id)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())


def test_owner_is_dead_by_pid_or_stale_heartbeat():
    here = socket.gethostname()
    live = Job(worker=f"{here}:{os.getpid()}", heartbeat_at=utcnow())
    assert not owner_is_dead(live, stale_after_s=60)
    assert owner_is_dead(Job(worker=f"{here}:{_dead_pid()}", heartbeat_at=utcnow()), 60)
    # another host's pid cannot be checked: only the heartbeat counts
    assert not owner_is_dead(Job(worker="elsewhere:1", heartbeat_at=utcnow()), 60)
    assert owner_is_dead(Job(worker="elsewhere:1", heartbeat_at=utcnow() - timedelta(seconds=61)), 60)
    assert owner_is_dead(Job(worker=None, heartbeat_at=None), 60)


def test_only_one_of_two_claims_wins(sqlite_url, make_job):
    job_id = make_job()
    with session_scope(sqlite_url) as s1, session_scope(sqlite_url) as s2:
        stale_view = s2.get(Job, job_id)  # s2 read the queued row before s1 claimed it
        first = claim_job(s1, job_id, 60)
        s1.commit()
        assert stale_view.state == "queued"
        second = claim_job(s2, job_id, 60)
    assert first.outcome == "claimed" and first.attempt == 1
    assert second.outcome == "skipped"
    job = _job(sqlite_url, job_id)
    assert (job.state, job.attempts, job.run_token, job.worker) == (
        "running",
        1,
        first.run_token,
        worker_identity(),
    )


def test_a_retried_claim_whose_commit_landed_is_still_claimed(sqlite_url, make_job):
    # the first try committed but its caller saw an error (a lost COMMIT acknowledgement) and retries
    # with the same token: the job is its own, not a live stranger's to skip
    job_id = make_job()
    with session_scope(sqlite_url) as s:
        first = claim_job(s, job_id, 60, token="mine")
    with session_scope(sqlite_url) as s:
        again = claim_job(s, job_id, 60, token="mine")
    with session_scope(sqlite_url) as s:
        other = claim_job(s, job_id, 60, token="another")
    assert (first.outcome, first.run_token, first.attempt) == ("claimed", "mine", 1)
    assert (again.outcome, again.run_token, again.attempt) == ("claimed", "mine", 1)
    assert other.outcome == "skipped"  # a different claim still finds a live owner
    job = _job(sqlite_url, job_id)
    assert (job.state, job.attempts, job.run_token) == ("running", 1, "mine")
    with session_scope(sqlite_url) as s:
        started = [r.message for r in s.query(JobLog).filter_by(job_id=job_id) if "started" in r.message]
    assert len(started) == 1  # and the retry wrote no second "attempt 1/N started" line


def test_a_live_owner_is_not_taken_over(sqlite_url, make_job):
    job_id = make_job(
        state="running", attempts=1, run_token="t", worker=worker_identity(), heartbeat_at=utcnow()
    )
    with session_scope(sqlite_url) as s:
        assert claim_job(s, job_id, 60).outcome == "skipped"
    assert _job(sqlite_url, job_id).run_token == "t"


def test_a_dead_owner_is_taken_over_and_counted(sqlite_url, make_job):
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    job_id = make_job(state="running", attempts=1, run_token="t", worker=dead, heartbeat_at=utcnow())
    with session_scope(sqlite_url) as s:
        result = claim_job(s, job_id, 60)
    assert result.outcome == "claimed" and result.takeover and result.attempt == 2
    with session_scope(sqlite_url) as s:
        logs = [r.message for r in s.query(JobLog).filter_by(job_id=job_id)]
    assert any("died" in m for m in logs)


def test_after_max_attempts_the_job_fails_with_a_reason(sqlite_url, make_job):
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    job_id = make_job(
        state="running",
        attempts=2,
        max_attempts=2,
        run_token="t",
        worker=dead,
        heartbeat_at=utcnow(),
        phase="finetune",
        step=7,
    )
    with session_scope(sqlite_url) as s:
        result = claim_job(s, job_id, 60)
    job = _job(sqlite_url, job_id)
    assert result.outcome == "failed"
    assert job.state == "failed" and job.error_phase == "finetune" and job.finished_at is not None
    assert "died" in job.error and "2 of 2 attempts" in job.error and "step 7/10" in job.error


def test_cancel_requested_before_the_claim(sqlite_url, make_job):
    job_id = make_job(cancel_requested=True)
    with session_scope(sqlite_url) as s:
        assert claim_job(s, job_id, 60).outcome == "cancelled"
    assert _job(sqlite_url, job_id).state == "cancelled"


def test_terminal_and_missing_jobs_are_skipped(sqlite_url, make_job):
    job_id = make_job(state="done")
    with session_scope(sqlite_url) as s:
        assert claim_job(s, job_id, 60).outcome == "skipped"
        assert claim_job(s, "nope", 60).outcome == "skipped"


def test_reaper_requeues_fails_and_cancels_dead_jobs(sqlite_url, make_job):
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    old = utcnow() - timedelta(hours=1)
    requeue = make_job(
        state="running", attempts=1, max_attempts=3, run_token="a", worker=dead, heartbeat_at=utcnow()
    )
    exhausted = make_job(
        state="running", attempts=3, max_attempts=3, run_token="b", worker="gone:1", heartbeat_at=old
    )
    cancelling = make_job(
        state="running", attempts=1, run_token="c", worker=dead, heartbeat_at=utcnow(), cancel_requested=True
    )
    alive = make_job(
        state="running", attempts=1, run_token="d", worker=worker_identity(), heartbeat_at=utcnow()
    )
    sent = []
    with session_scope(sqlite_url) as s:
        changed = reap_dead_jobs(s, 60, sent.append)
    assert sorted(changed) == sorted([requeue, exhausted, cancelling])
    assert sent == [requeue]
    states = {j: _job(sqlite_url, j).state for j in (requeue, exhausted, cancelling, alive)}
    assert states == {requeue: "queued", exhausted: "failed", cancelling: "cancelled", alive: "running"}
    assert _job(sqlite_url, requeue).run_token is None
    # the re-queued job is claimable again, as attempt 2
    with session_scope(sqlite_url) as s:
        assert claim_job(s, requeue, 60).attempt == 2
