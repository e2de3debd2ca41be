"""Disk quota per user (uploads 413, job submission 403, other users unaffected) and the
retention policy (old unpinned artifacts and rejected uploads removed; pinned and recent kept)."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from app.main import create_app, retain_once
from tests.app.conftest import _token
from worker.db import session_scope
from worker.intake import intake_checkpoint
from worker.models import Artifact, Checkpoint, Job, JobLog, utcnow
from worker.retention import apply_retention

SMOKE = {"bits": "W4A4", "budget": "smoke", "device": "cpu"}


def _upload(client, headers, data: bytes):
    return client.post(
        "/api/v1/checkpoints",
        headers=headers,
        files={"file": ("t.safetensors", data)},
        data={"arch": "resnet20"},
    )


def test_quota_refuses_uploads_and_jobs_of_the_user_over_it(settings, random_checkpoint):
    data = random_checkpoint.read_bytes()
    quota = len(data) + 1000
    limited = settings.model_copy(update={"user_quota_bytes": quota})
    with TestClient(create_app(limited)) as client:
        alice = {"Authorization": f"Bearer {_token(limited, 'alice')}"}
        bob = {"Authorization": f"Bearer {_token(limited, 'bob')}"}
        first = _upload(client, alice, data)
        assert first.status_code == 202
        r = _upload(client, alice, data)  # would take alice past her quota
        assert r.status_code == 413 and "disk quota exceeded" in r.json()["detail"]
        assert len(list(limited.checkpoints_dir.iterdir())) == 1  # the refused upload left nothing
        assert _upload(client, bob, data).status_code == 202  # bob has his own quota

        assert intake_checkpoint(first.json()["id"], limited) == "ready"
        body = {"checkpoint_id": first.json()["id"], "spec": SMOKE}
        job = client.post("/api/v1/jobs", headers=alice, json=body)
        assert job.status_code == 201
        with session_scope(limited.resolved_database_url) as s:  # the job's artifacts fill the quota
            s.add(Artifact(job_id=job.json()["id"], owner_id=s.get(Job, job.json()["id"]).owner_id,
                           name="big.bin", kind="other", size_bytes=2000))  # fmt: skip
        r = client.post("/api/v1/jobs", headers=alice, json=body)
        assert r.status_code == 403 and "disk quota exceeded" in r.json()["detail"]
        assert client.get("/api/v1/jobs", headers=alice).json()["total"] == 1


def _finished_job(url, jobs_dir, owner_id, ckpt_id, age_days, pinned=False) -> str:
    with session_scope(url) as s:
        job = Job(owner_id=owner_id, checkpoint_id=ckpt_id, spec={}, state="done", pinned=pinned,
                  finished_at=utcnow() - timedelta(days=age_days))  # fmt: skip
        s.add(job)
        s.flush()
        s.add(Artifact(job_id=job.id, owner_id=owner_id, name="report.json", kind="report", size_bytes=2))
        (jobs_dir / job.id).mkdir(parents=True)
        (jobs_dir / job.id / "report.json").write_text("{}")
        return job.id


def test_retention_removes_old_unpinned_artifacts_and_rejected_uploads(
    client, settings, alice, ready_checkpoint
):
    url = settings.resolved_database_url
    with session_scope(url) as s:
        ckpt = s.get(Checkpoint, ready_checkpoint)
        owner = ckpt.owner_id
        old_rejected = Checkpoint(
            owner_id=owner,
            name="bad",
            arch="resnet20",
            state="rejected",
            error="x",
            sha256="0" * 64,
            size_bytes=1,
            updated_at=utcnow() - timedelta(days=40),
        )
        new_rejected = Checkpoint(owner_id=owner, name="bad2", arch="resnet20", state="rejected", error="x",
                                  sha256="0" * 64, size_bytes=1)  # fmt: skip
        s.add_all([old_rejected, new_rejected])
        s.flush()
        rejected_ids = old_rejected.id, new_rejected.id
    (settings.checkpoints_dir / rejected_ids[0]).mkdir()
    old = _finished_job(url, settings.jobs_dir, owner, ready_checkpoint, 40)
    pinned = _finished_job(url, settings.jobs_dir, owner, ready_checkpoint, 40)
    recent = _finished_job(url, settings.jobs_dir, owner, ready_checkpoint, 1)
    assert client.post(f"/api/v1/jobs/{pinned}/pin", headers=alice).json()["pinned"] is True

    result = retain_once(client.app)  # the API's periodic pass, default DFQ_RETENTION_DAYS=30
    assert result.jobs == [old] and result.checkpoints == [rejected_ids[0]]
    assert (
        not (settings.jobs_dir / old).exists() and not (settings.checkpoints_dir / rejected_ids[0]).exists()
    )
    assert (settings.jobs_dir / pinned).exists() and (settings.jobs_dir / recent).exists()
    gone = client.get(f"/api/v1/jobs/{old}", headers=alice).json()
    assert gone["state"] == "done" and gone["artifacts_expired_at"]  # the job's record stays
    assert client.get(f"/api/v1/jobs/{old}/artifacts", headers=alice).json() == []
    assert [a["name"] for a in client.get(f"/api/v1/jobs/{pinned}/artifacts", headers=alice).json()] == [
        "report.json"
    ]
    with session_scope(url) as s:
        assert s.get(Checkpoint, rejected_ids[1]) is not None
        assert s.query(JobLog).filter_by(job_id=old).one().message.startswith("artifacts removed")
        assert apply_retention(s, settings.jobs_dir, settings.checkpoints_dir, 30).jobs == []  # idempotent
        assert apply_retention(s, settings.jobs_dir, settings.checkpoints_dir, 0).jobs == []  # 0 keeps all
    assert client.post(f"/api/v1/jobs/{pinned}/unpin", headers=alice).json()["pinned"] is False
    assert retain_once(client.app).jobs == [pinned]
