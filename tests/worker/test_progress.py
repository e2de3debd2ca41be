"""JobReporter: throttled writes, ownership checks, resume trimming, throttled cancel reads."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from dfq.pipeline import Event
from tests.faults import ack_lost_once
from worker.db import session_scope
from worker.events import Publisher
from worker.models import Artifact, Job, JobLog, MetricPoint
from worker.progress import JobReporter, LostOwnership, artifact_kind, eta_seconds


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class RecordingPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[tuple[str, dict]] = []

    def publish(self, job_id, kind, data):
        self.sent.append((kind, data))


@pytest.fixture
def reporter(sqlite_url, make_job, tmp_path):
    job_id = make_job(state="running", run_token="tok", attempts=1)
    with session_scope(sqlite_url) as s:
        owner = s.get(Job, job_id).owner_id
    clock = Clock()
    out = tmp_path / "job"
    out.mkdir()
    return JobReporter(
        sqlite_url, job_id, "tok", owner, RecordingPublisher(), out, 1.0, 0.5, 1.0, clock
    ), clock


def step(n, phase="warmup"):
    return Event("step", phase, n, 10, 0, {"g_loss": 1.0 / n, "it_per_s": 2.0})


def _row(reporter) -> Job:
    with session_scope(reporter.db_url) as s:
        return s.get(Job, reporter.job_id)


def test_step_events_are_written_at_most_once_per_interval(reporter):
    rep, clock = reporter
    rep.on_event(Event("phase", "warmup", 0, 10, 0))
    writes = rep.writes
    for n in range(1, 6):
        clock.t += 0.1
        rep.on_event(step(n))
    assert rep.writes == writes  # within the interval of the phase write: buffered
    assert _row(rep).step == 0
    clock.t += 1.0
    rep.on_event(step(6))
    assert rep.writes == writes + 1
    row = _row(rep)
    assert (row.step, row.phase, row.total) == (6, "warmup", 10)
    assert row.metrics["g_loss"] == pytest.approx(1 / 6)
    assert row.rate and row.rate > 0
    with session_scope(rep.db_url) as s:
        steps = (
            s.execute(
                select(MetricPoint.step).where(MetricPoint.job_id == rep.job_id).order_by(MetricPoint.step)
            )
            .scalars()
            .all()
        )
    assert steps == [1, 2, 3, 4, 5, 6]  # every point is kept, only the writes are batched


def test_publishing_is_throttled_for_steps_but_not_for_other_events(reporter):
    rep, clock = reporter
    for n in range(1, 4):
        clock.t += 0.1
        rep.on_event(step(n))
    rep.on_event(Event("eval", "finetune", 3, 10, 1, {"q_top1": 50.0, "n_eval": 10}))
    kinds = [k for k, _ in rep.publisher.sent]
    assert kinds == ["step", "eval"]


def test_lost_ownership_stops_the_attempt(reporter):
    rep, _clock = reporter
    with session_scope(rep.db_url) as s:
        s.execute(update(Job).where(Job.id == rep.job_id).values(run_token="someone-else"))
    with pytest.raises(LostOwnership):
        rep.on_event(Event("phase", "warmup", 0, 10, 0))


def test_a_resumed_attempt_drops_points_after_its_checkpoint(reporter, sqlite_url):
    rep, _clock = reporter
    with session_scope(sqlite_url) as s:
        s.add_all(
            [MetricPoint(job_id=rep.job_id, kind="step", step=n, epoch=0, values={}) for n in range(1, 9)]
        )
    rep.on_event(Event("phase", "finetune", 5, 10, 1))  # the pipeline resumed at step 5
    with session_scope(sqlite_url) as s:
        steps = s.execute(select(MetricPoint.step).where(MetricPoint.job_id == rep.job_id)).scalars().all()
    assert sorted(steps) == [1, 2, 3, 4, 5]


def test_cancel_flag_is_read_at_most_once_per_interval(reporter, sqlite_url):
    rep, clock = reporter
    assert rep.should_cancel() is False
    with session_scope(sqlite_url) as s:
        s.execute(update(Job).where(Job.id == rep.job_id).values(cancel_requested=True))
    clock.t += 0.5
    assert rep.should_cancel() is False  # not re-read yet
    clock.t += 0.6
    assert rep.should_cancel() is True


def test_finish_writes_state_and_artifacts(reporter, sqlite_url):
    rep, _clock = reporter
    tmp_path = rep.out_dir
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_000003.png").write_bytes(b"png")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "state.pt").write_bytes(b"x")
    rep.on_event(Event("samples", "warmup", 3, 10, 0))
    rep.register_files(tmp_path, {"state.pt"})
    rep.finish("done", report={"q_top1": 1.0})
    row = _row(rep)
    assert row.state == "done" and row.finished_at is not None and row.report == {"q_top1": 1.0}
    with session_scope(sqlite_url) as s:
        arts = {a.name: (a.kind, a.size_bytes) for a in s.execute(select(Artifact)).scalars()}
    assert arts == {"samples/step_000003.png": ("samples", 3), "report.json": ("report", 2)}
    assert rep.publisher.sent[-1][0] == "state" and rep.publisher.sent[-1][1]["state"] == "done"


def test_helpers():
    assert eta_seconds(5, 10, 2.5) == 2.0
    assert eta_seconds(5, 10, None) is None
    assert artifact_kind("quantized.safetensors") == "quantized"
    assert artifact_kind("attention/step_1.png") == "attention"
    assert (
        artifact_kind("model.qdq.onnx") == "onnx"
        and artifact_kind("quantized.packed.safetensors") == "packed"
    )


def test_nan_and_inf_become_null_so_progress_stays_writable(reporter):
    rep, _clock = reporter
    rep.on_event(
        Event("step", "warmup", 1, 10, 0, {"g_loss": float("nan"), "s_loss": float("inf"), "ok": 1.0})
    )
    rep.finish("done", report={"diag": float("nan"), "nested": [float("-inf"), 2.0]})
    row = _row(rep)
    assert row.state == "done" and row.metrics == {"g_loss": None, "s_loss": None, "ok": 1.0}
    assert row.report == {"diag": None, "nested": [None, 2.0]}


def test_an_unwritable_result_still_ends_the_job(reporter):
    rep, _clock = reporter
    rep.finish("done", report={"not json": object()})
    row = _row(rep)
    assert (
        row.state == "failed"
        and row.error.startswith("could not record the result")
        and row.error_phase == "finish"
    )


def test_a_samples_event_also_lists_the_attention_figure_of_that_step(reporter, sqlite_url):
    rep, _clock = reporter
    for folder, files in (
        ("samples", ["step_000004.png"]),
        ("attention", ["step_000004.png", "step_000004.json"]),
    ):
        (rep.out_dir / folder).mkdir()
        for name in files:
            (rep.out_dir / folder / name).write_bytes(b"12345")
    rep.on_event(Event("samples", "warmup", 4, 10, 0))
    with session_scope(sqlite_url) as s:
        arts = {a.name: a.kind for a in s.execute(select(Artifact)).scalars()}
    assert arts == {
        "samples/step_000004.png": "samples",
        "attention/step_000004.png": "attention",
        "attention/step_000004.json": "attention",
    }
    kind, payload = rep.publisher.sent[-1]
    assert kind == "samples" and payload["attention"] == "attention/step_000004.png"


def test_a_retry_after_a_commit_that_landed_writes_each_point_once(reporter, monkeypatch):
    rep, _ = reporter
    failed = ack_lost_once(monkeypatch, MetricPoint)
    for n in range(1, 4):
        rep.on_event(step(n))
    rep.flush()
    assert failed  # the write did fail once, after committing
    with session_scope(rep.db_url) as s:
        steps = sorted(s.execute(select(MetricPoint.step).where(MetricPoint.job_id == rep.job_id)).scalars())
    assert steps == [1, 2, 3]


def test_a_retry_after_a_commit_that_landed_writes_each_log_line_once(reporter, monkeypatch):
    rep, _ = reporter
    with session_scope(rep.db_url) as s:  # a line from before this attempt, with the same text
        s.add(JobLog(job_id=rep.job_id, message="phase warmup from step 0/10"))
    failed = ack_lost_once(monkeypatch, JobLog)
    rep.on_event(Event("phase", "warmup", 0, 10, 0))  # a phase event writes at once: one line
    rep.log("a second line")
    rep.flush()
    assert failed
    with session_scope(rep.db_url) as s:
        lines = s.execute(select(JobLog.message).where(JobLog.job_id == rep.job_id).order_by(JobLog.id))
        lines = list(lines.scalars())
    # each line once; the earlier line of the same text is not taken for a retried one
    assert lines == ["phase warmup from step 0/10"] * 2 + ["a second line"]


def test_a_retried_final_write_whose_commit_landed_still_finishes_the_job(reporter, monkeypatch):
    rep, _ = reporter
    failed = ack_lost_once(monkeypatch, JobLog)  # the final write is the first to add a log line
    rep.finish("done", report={"q_top1": 1.0})  # before the fix: LostOwnership (the job is no longer running)
    assert failed
    assert rep.publisher.sent[-1][0] == "state" and rep.publisher.sent[-1][1]["state"] == "done"
    with session_scope(rep.db_url) as s:
        job = s.get(Job, rep.job_id)
        assert (job.state, job.report) == ("done", {"q_top1": 1.0})
        lines = list(s.execute(select(JobLog.message).where(JobLog.job_id == rep.job_id)).scalars())
    assert lines == ["job done"]


def test_a_job_finished_by_someone_else_is_still_lost_ownership(reporter):
    rep, _ = reporter
    # the same state under the same token, written by another write: its finished_at is not this one's
    with session_scope(rep.db_url) as s:
        s.execute(update(Job).where(Job.id == rep.job_id).values(state="done"))
    with pytest.raises(LostOwnership):
        rep.finish("done", report={"q_top1": 1.0})
