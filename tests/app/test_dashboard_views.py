"""How the pages describe a job: summary row, accuracy table, per-layer bars, attention numbers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from app.web.render import age, duration, num
from app.web.views import JobRow, accuracy_table, attention_summary, layer_rows, teacher_classes
from dfq.spec import JobSpec
from worker.db import session_scope
from worker.models import Job

from .conftest import login


def _row(
    spec: dict, state: str = "done", report: dict | None = None, step: int = 0, total: int = 20
) -> JobRow:
    job = Job(id="a" * 32, spec=JobSpec.model_validate(spec).canonical(), state=state, step=step, total=total)
    job.report = report
    return JobRow(job, "alice", "resnet20_fmnist")


def test_row_summarises_method_bits_progress_and_accuracy():
    r = _row({"method": "dsg+lrq", "bits": "W4A4-F8L8", "budget": "smoke"}, "running", step=5)
    assert (r.method, r.bits, r.budget, r.percent, r.active) == ("dsg+lrq", "W4A4-F8L8", "smoke", 25.0, True)
    assert r.accuracy == (None, "")
    done = _row({"bits": "W3A3"}, report={"q_top1": 81.5, "agreement_synthetic": None})
    assert done.accuracy == (81.5, "top-1") and done.percent == 100.0
    synthetic = _row({"bits": "W3A3"}, report={"q_top1": None, "agreement_synthetic": 77.0})
    assert synthetic.accuracy == (77.0, "agreement (synthetic)")
    assert done.matches("GDFQ", "w3", "resnet20") and not done.matches("dsg", "", "")
    assert not done.matches("", "", "mobilenet")


def test_accuracy_table_and_layer_bars():
    report = {
        "fp_top1": 92.4, "q_top1": 88.1, "agreement": 90.0, "n_eval": 10000, "eval_set": "fashion-mnist-test",
        "bits": "W4A4", "best_epoch": {"epoch": 15, "q_top1": 88.9},
        "layer_errors": [{"layer": "conv1", "rel_mse": 0.02}, {"layer": "fc", "rel_mse": 0.005}],
    }  # fmt: skip
    rows = accuracy_table(report)
    assert [r[0] for r in rows] == [
        "teacher (full precision) top-1 %",
        "student (W4A4) top-1 %",
        "drop (points)",
        "teacher-student agreement %",
        "best per-epoch student top-1 %",
    ]
    assert rows[2][1] == 4.3 and "10000 images" in rows[0][2]
    assert [r["bar"] for r in layer_rows(report)] == [100.0, 25.0]
    assert accuracy_table({}) == [] and layer_rows({}) == []


def test_attention_summary_averages_each_class_row(tmp_path):
    assert attention_summary(tmp_path, ["a"]) is None
    data = {
        "stage": "layer3",
        "per_row": 2,
        "tv": [0.1, 0.3, 0.5, 0.7],
        "tv_mean": 0.4,
        "center_shift_mean": 0.1,
    }
    (tmp_path / "attention.json").write_text(json.dumps(data))
    s = attention_summary(tmp_path, ["T-shirt", "Trouser"])
    assert [(r["class"], round(r["tv"], 3)) for r in s["rows"]] == [("T-shirt", 0.2), ("Trouser", 0.6)]
    assert teacher_classes({"teacher": {"classes": ["x", "y"]}}, None) == ["x", "y"]
    assert teacher_classes({}, {"num_classes": 3}) == ["class 0", "class 1", "class 2"]


def test_filters_format_what_people_scan():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert age(now - timedelta(seconds=42), now) == "42 s"
    assert age(now - timedelta(minutes=5, seconds=3), now) == "5 min"
    assert age(now - timedelta(days=2, hours=1), now) == "2 d"
    assert duration(3725) == "1 h 02 min" and duration(75) == "1 min 15 s" and duration(None) == ""
    assert (
        num(None) == "—" and num(0.0001, 2) == "1.0e-04" and num(92.4) == "92.40" and num(float("nan")) == "—"
    )


def test_a_job_without_generator_steps_says_why_it_has_no_samples(
    client, settings, alice, alice_token, ready_checkpoint
):
    ids = [
        client.post(
            "/api/v1/jobs",
            headers=alice,
            json={"checkpoint_id": ready_checkpoint, "spec": {"budget": "smoke"}},
        ).json()["id"]
        for _ in range(2)
    ]
    skipped = {"reason": "no student step, all 35 activation ranges from the teacher's BN", "steps": 80}
    with session_scope(settings.resolved_database_url) as s:
        for job_id, gen in zip(ids, (skipped, None), strict=True):
            s.execute(
                update(Job).where(Job.id == job_id).values(state="done", report={"generator_skipped": gen})
            )
    login(client, alice_token)
    page = client.get(f"/jobs/{ids[0]}").text
    assert "No sample grids: the generator's 80 steps were left out" in page
    assert "all 35 activation ranges from the teacher&#39;s BN" in page
    assert "No sample grid yet" in client.get(f"/jobs/{ids[1]}").text
    compare = client.get(f"/compare?ids={ids[0]}&ids={ids[1]}").text
    assert compare.count("/artifacts/samples.png") == 1  # the trained job's grid, not the skipped one's
    assert f'src="/api/v1/jobs/{ids[0]}/artifacts/samples.png"' not in compare
    assert "No sample grid: the generator's steps were left out" in compare
