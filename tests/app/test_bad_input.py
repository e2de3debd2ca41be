"""Impossible specs fail with field-level messages and queue nothing; job submission is rate
limited per token (429 with Retry-After) without touching other tokens."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.ratelimit import RateLimited, SlidingWindowLimiter
from tests.app.conftest import _token, queued_messages

SMOKE = {"bits": "W4A4", "budget": "smoke", "device": "cpu"}

# spec -> (the field the error must point at, a word its message must contain)
IMPOSSIBLE = [
    ({"bits": "W0A4"}, ["quant"], "bit-width"),
    ({"bits": "W4A33"}, ["quant"], "bit-width"),
    ({"quant": {"w_bits": 33}}, ["quant", "w_bits"], "bit-width"),
    ({"bits": "W4A4", "budget": {"preset": "smoke", "epochs": -3}}, ["budget", "epochs"], "greater"),
    ({"bits": "W4A4", "budget": {"preset": "smoke", "lr_s": -0.1}}, ["budget", "lr_s"], "greater"),
    ({"bits": "W4A4", "budget": {"preset": "smoke", "batch_size": 10**9}}, ["budget", "batch_size"], "less"),
    ({"bits": "W4A4", "budget": {"preset": "smoke", "iters_per_epoch": 0}}, ["budget", "iters_per_epoch"], "greater"),
    ({"method": {"preset": "dsg", "dsg": {"teleport": True}}}, ["method", "dsg", "teleport"], "Extra inputs"),
    ({"method": {"preset": "gdfq", "warp_drive": {}}}, ["method", "warp_drive"], "Extra inputs"),
    ({"bits": "W4A4", "seed": -1}, ["seed"], "greater"),
    ({"bits": "W4A4", "device": "tpu:0"}, ["device"], "pattern"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "field", "word"), IMPOSSIBLE)
def test_impossible_specs_fail_with_field_level_messages(client, settings, alice, spec, field, word):
    before = queued_messages(settings)
    r = client.post("/api/v1/jobs", headers=alice, json={"checkpoint_id": "x", "spec": spec})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    hit = [e for e in errors if e["loc"][:2] == ["body", "spec"] and e["loc"][2 : 2 + len(field)] == field]
    assert hit, errors
    assert any(word.lower() in e["msg"].lower() for e in hit), errors
    assert queued_messages(settings) == before


def test_job_submission_is_rate_limited_per_token(settings, random_checkpoint):
    limited = settings.model_copy(update={"job_submit_limit": 2, "job_submit_window_s": 3600})
    with TestClient(create_app(limited)) as client:
        alice = {"Authorization": f"Bearer {_token(limited, 'alice')}"}
        alice2 = {"Authorization": f"Bearer {_token(limited, 'alice')}"}  # a second token, same user
        r = client.post(
            "/api/v1/checkpoints", headers=alice, files={"file": random_checkpoint.read_bytes()},
            data={"arch": "resnet20"},
        )  # fmt: skip
        from worker.intake import intake_checkpoint

        assert intake_checkpoint(r.json()["id"], limited) == "ready"
        body = {"checkpoint_id": r.json()["id"], "spec": SMOKE}
        assert [client.post("/api/v1/jobs", headers=alice, json=body).status_code for _ in range(2)] == [
            201,
            201,
        ]
        before = queued_messages(limited)
        r = client.post("/api/v1/jobs", headers=alice, json=body)
        assert r.status_code == 429 and "rate limit" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 3600
        job_id = client.get("/api/v1/jobs", headers=alice).json()["items"][0]["id"]
        assert client.post(f"/api/v1/jobs/{job_id}/clone", headers=alice, json={}).status_code == 429
        assert queued_messages(limited) == before  # a refused submission queues nothing
        assert client.get("/api/v1/jobs", headers=alice).json()["total"] == 2
        assert client.post("/api/v1/jobs", headers=alice2, json=body).status_code == 201
        assert client.get("/api/v1/jobs", headers=alice).status_code == 200  # reads are not limited


def test_the_window_slides():
    now = [0.0]
    limiter = SlidingWindowLimiter(2, 10.0, clock=lambda: now[0])
    limiter.hit("a")
    now[0] = 4.0
    limiter.hit("a")
    with pytest.raises(RateLimited) as exc:
        limiter.hit("a")
    assert exc.value.retry_after_s == 6
    limiter.hit("b")  # keys are independent
    now[0] = 10.5  # the first event left the window
    limiter.hit("a")
    SlidingWindowLimiter(0, 1.0).hit("a")  # 0 disables the limit
