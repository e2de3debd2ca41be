"""The service end to end, with real processes: uvicorn, Celery workers (forked job processes),
on the embedded SQLite + filesystem broker and on Redis + PostgreSQL.

Each stack runs the same tests: upload the bundled teacher, follow smoke jobs to ``done`` by
polling and by SSE, download and load the artifact, cancel a running job, SIGKILL the process
running a job (resumed from its checkpoint; failed with a reason when attempts run out), kill and
restart the whole worker side, and keep one user's jobs invisible to another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time

import httpx
import pytest
import torch

from dfq.artifacts import load_quantized
from tests.e2e.specs import BUNDLED, LONG, SMOKE, TINY
from tests.e2e.stack import MAX_UPLOAD, start_embedded, start_redis_postgres

pytestmark = pytest.mark.slow
TERMINAL = {"done", "failed", "cancelled"}


@pytest.fixture(scope="module", params=["embedded", "redis-postgres"])
def stack(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        s = start_embedded(tmp)
    else:
        s = start_redis_postgres(
            tmp, request.getfixturevalue("redis_url"), request.getfixturevalue("postgres_url")
        )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    return stack.token("alice")


@pytest.fixture(scope="module")
def api(stack, alice):
    with httpx.Client(base_url=stack.base_url, headers=alice, timeout=30) as client:
        yield client


def wait_job(api, job_id, until, timeout=240, what="", stack=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/v1/jobs/{job_id}").json()
        if until(job):
            return job
        if job["state"] in TERMINAL:
            raise AssertionError(f"job ended {job['state']} while waiting for {what}: {job['error']}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {job}\n{stack.logs() if stack else ''}")


@pytest.fixture(scope="module")
def teacher(stack, api):
    """The bundled ResNet-20 teacher, uploaded through the API and ready."""
    data = BUNDLED.read_bytes()
    r = api.post("/api/v1/checkpoints", files={"file": (BUNDLED.name, data)}, data={"arch": "resnet20"})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "pending"
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    ckpt_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while (c := api.get(f"/api/v1/checkpoints/{ckpt_id}").json())["state"] == "pending":
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    assert c["state"] == "ready", c["error"]
    return c


def start_job(api, teacher, spec) -> dict:
    r = api.post("/api/v1/jobs", json={"checkpoint_id": teacher["id"], "spec": spec})
    assert r.status_code == 201, r.text
    return r.json()


def test_uploaded_bundled_teacher_is_recognised(teacher):
    assert teacher["info"]["bundled"] == "resnet20_fmnist"
    assert teacher["info"]["input_shape"] == [1, 28, 28] and teacher["info"]["num_classes"] == 10
    assert teacher["info"]["mean"] != [0.0]  # the manifest's normalisation, not the default


def test_bad_uploads_are_rejected_or_refused(stack, api):
    r = api.post(
        "/api/v1/checkpoints",
        files={"file": ("x.pt", b"\x80\x04not a checkpoint")},
        data={"arch": "resnet20"},
    )
    assert r.status_code == 202
    deadline = time.monotonic() + 60
    while (c := api.get(f"/api/v1/checkpoints/{r.json()['id']}").json())["state"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert c["state"] == "rejected" and "pickle" in c["error"]

    before = set(os.listdir(stack.data_dir / "checkpoints"))

    def chunks():  # no Content-Length: the cap is enforced while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="arch"\r\n\r\nresnet20\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big"\r\n\r\n'
        for _ in range(MAX_UPLOAD // 65536 + 20):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    r = api.post(
        "/api/v1/checkpoints", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413
    assert set(os.listdir(stack.data_dir / "checkpoints")) == before  # the partial file is gone


def test_smoke_job_to_done_by_polling_then_download_and_load(stack, api, teacher, tmp_path):
    job = start_job(api, teacher, SMOKE)
    assert job["state"] == "queued"
    seen = set()

    def done(j):
        seen.add(j["state"])
        return j["state"] == "done"

    job = wait_job(api, job["id"], done, what="done", stack=stack)
    assert "running" in seen or job["attempts"] == 1
    assert job["step"] == job["total"] == 4 and job["error"] is None and job["finished_at"]
    assert job["result"]["bits"] == "W4A4" and job["result"]["agreement_synthetic"] is not None
    assert set(job["metrics"]) >= {"g_loss", "s_loss", "g_bns"}

    artifacts = {a["name"]: a for a in api.get(f"/api/v1/jobs/{job['id']}/artifacts").json()}
    assert {"quantized.safetensors", "report.json", "samples.png"} <= set(artifacts)
    r = api.get(artifacts["quantized.safetensors"]["url"])
    assert r.status_code == 200 and len(r.content) == artifacts["quantized.safetensors"]["size_bytes"]
    path = tmp_path / "q.safetensors"
    path.write_bytes(r.content)
    model, spec, info = load_quantized(path)
    assert spec.quant.label == "W4A4" and info.input_shape == (1, 28, 28)
    with torch.no_grad():
        assert model(torch.randn(2, *info.input_shape)).shape == (2, 10)
    report = api.get(artifacts["report.json"]["url"]).json()
    assert report["spec"] == job["spec"]

    points = api.get(f"/api/v1/jobs/{job['id']}/metrics?kind=step").json()
    assert [p["step"] for p in points] == [1, 2, 3, 4] and "g_loss" in points[0]["values"]
    logs = [line["message"] for line in api.get(f"/api/v1/jobs/{job['id']}/logs").json()]
    assert any(m.startswith("attempt 1/") for m in logs) and logs[-1] == "job done"


def read_sse(response) -> list[tuple[str, dict]]:
    events, kind, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and kind:
            events.append((kind, json.loads("\n".join(data))))
            if kind == "end":
                break
            kind, data = None, []
    return events


def test_smoke_job_to_done_by_sse(stack, api, teacher):
    job = start_job(api, teacher, SMOKE)
    with api.stream("GET", f"/api/v1/jobs/{job['id']}/events", timeout=httpx.Timeout(30, read=240)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    kinds = [k for k, _ in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "end"
    assert events[-1][1]["state"] == "done"
    steps = [d["step"] for k, d in events if k in ("step", "progress", "phase") and d.get("step") is not None]
    assert steps == sorted(steps) and steps and steps[-1] >= 1
    if stack.kind == "redis-postgres":
        assert "step" in kinds and "state" in kinds  # relayed from the worker through Redis pub/sub
    else:
        assert "progress" in kinds  # polled from the job row (no Redis in embedded mode)
    assert api.get(f"/api/v1/jobs/{job['id']}").json()["state"] == "done"


def test_cancel_a_running_job(stack, api, teacher):
    job = start_job(api, teacher, LONG)
    wait_job(
        api, job["id"], lambda j: j["state"] == "running" and j["step"] >= 1, what="running", stack=stack
    )
    r = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    deadline = time.monotonic() + 120
    while (j := api.get(f"/api/v1/jobs/{job['id']}").json())["state"] not in TERMINAL:
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.05)
    assert j["state"] == "cancelled" and j["step"] < j["total"] and j["error"] is None
    assert (stack.data_dir / "jobs" / job["id"] / "state.pt").exists()  # resumable if re-run
    arts = {a["name"]: a for a in api.get(f"/api/v1/jobs/{job['id']}/artifacts").json()}
    assert "metrics.jsonl" in arts and all(a["partial"] for a in arts.values())  # kept, marked partial
    assert "state.pt" not in arts and "quantized.safetensors" not in arts


def _pid(job) -> int:
    return int(job["worker"].rsplit(":", 1)[1])


def test_sigkill_mid_job_resumes_from_the_checkpoint(stack, api, teacher):
    job = start_job(api, teacher, LONG)
    job = wait_job(
        api, job["id"], lambda j: j["state"] == "running" and j["step"] >= 3, what="step 3", stack=stack
    )
    os.kill(_pid(job), signal.SIGKILL)
    job = wait_job(api, job["id"], lambda j: j["state"] == "done", what="done after resume", stack=stack)
    assert job["attempts"] == 2 and job["step"] == job["total"]
    assert job["result"]["resumed_from_step"] >= 2
    logs = [line["message"] for line in api.get(f"/api/v1/jobs/{job['id']}/logs").json()]
    assert any("died" in m for m in logs), logs
    assert any(m.startswith("resuming from the saved state") for m in logs), logs
    steps = [p["step"] for p in api.get(f"/api/v1/jobs/{job['id']}/metrics?kind=step").json()]
    assert steps == list(range(1, job["total"] + 1))  # re-run steps replaced, not duplicated


def test_sigkill_on_every_attempt_ends_failed_with_a_reason(stack, api, teacher):
    job = start_job(api, teacher, LONG)
    first = wait_job(
        api, job["id"], lambda j: j["state"] == "running" and j["step"] >= 1, what="attempt 1", stack=stack
    )
    os.kill(_pid(first), signal.SIGKILL)
    second = wait_job(
        api, job["id"], lambda j: j["attempts"] == 2 and j["state"] == "running" and j["worker"] != first["worker"],
        what="attempt 2", stack=stack,
    )  # fmt: skip
    os.kill(_pid(second), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while (j := api.get(f"/api/v1/jobs/{job['id']}").json())["state"] == "running":
        assert time.monotonic() < deadline, f"stuck running: {j}\n{stack.logs()}"
        time.sleep(0.1)
    assert j["state"] == "failed" and j["attempts"] == 2
    assert "died" in j["error"] and "2 of 2 attempts" in j["error"] and j["error_phase"]


def test_killing_the_whole_worker_side_then_restarting_resumes(stack, api, teacher):
    job = start_job(api, teacher, LONG)
    job = wait_job(
        api, job["id"], lambda j: j["state"] == "running" and j["step"] >= 3, what="step 3", stack=stack
    )
    name = "serve" if stack.kind == "embedded" else "gpu"
    proc = stack.procs[name]
    proc.kill_group(signal.SIGKILL)  # the API (embedded), the worker parent and the job's process
    proc.popen.wait()
    offset = proc.log.stat().st_size
    stack.start(name, proc.argv)
    if stack.kind == "embedded":
        stack.wait_healthy()
    else:
        stack.wait_worker_ready(name, after=offset)
    job = wait_job(api, job["id"], lambda j: j["state"] == "done", what="done after restart", stack=stack)
    assert job["attempts"] == 2 and job["result"]["resumed_from_step"] >= 2


def test_a_second_token_cannot_see_the_first_tokens_jobs(stack, api, teacher):
    job = start_job(api, teacher, SMOKE)
    bob = stack.token("bob")
    with httpx.Client(base_url=stack.base_url, headers=bob, timeout=30) as other:
        assert other.get("/api/v1/jobs").json()["total"] == 0
        assert other.get(f"/api/v1/jobs/{job['id']}").status_code == 404
        assert other.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 404
        assert other.get(f"/api/v1/jobs/{job['id']}/artifacts").status_code == 404
        assert other.get(f"/api/v1/jobs/{job['id']}/events").status_code == 404
        assert other.get(f"/api/v1/checkpoints/{teacher['id']}").status_code == 404
        r = other.post("/api/v1/jobs", json={"checkpoint_id": teacher["id"], "spec": SMOKE})
        assert r.status_code == 422
    assert api.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    wait_job(api, job["id"], lambda j: j["state"] == "done", what="done", stack=stack)


def test_browser_pages_log_in_and_show_a_job(stack, api, alice, teacher):
    """The pages' HTTP contract without a browser (tests/e2e/test_dashboard.py drives Chromium)."""
    token = alice["Authorization"].split()[1]
    with httpx.Client(base_url=stack.base_url, timeout=30) as browser:
        assert browser.get("/jobs").status_code == 303
        assert browser.post("/login", data={"token": token}).status_code == 403  # no CSRF token
        login = browser.get("/login")
        form_csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)[1]
        r = browser.post("/login", data={"token": token, "csrf_token": form_csrf})
        assert r.status_code == 303 and "dfq_session" in r.headers["set-cookie"]
        assert token not in r.headers["set-cookie"]  # the browser holds a session, not the token
        new = browser.get("/jobs/new").text
        assert "Start job" in new
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', new)[1]
        r = browser.post("/ui/checkpoints/bundled", data={"name": "resnet20_fmnist"})
        assert r.status_code == 403  # forms without the session's CSRF token are refused
        r = browser.post("/ui/checkpoints/bundled", data={"name": "resnet20_fmnist", "csrf_token": csrf})
        assert r.status_code == 303
        r = browser.post(
            "/ui/checkpoints",
            files={"file": ("t.safetensors", BUNDLED.read_bytes())},
            data={"arch": "resnet20", "csrf_token": csrf},
        )
        assert r.status_code == 303
        mine = api.get("/api/v1/checkpoints?limit=500").json()["items"]
        assert {"resnet20_fmnist", "t.safetensors"} <= {c["name"] for c in mine}
        r = browser.post(
            "/ui/jobs",
            data={
                "csrf_token": csrf,
                "checkpoint_id": teacher["id"],
                "bits": "W4A4",
                "budget.preset": "smoke",
                "extra": json.dumps({"budget": TINY, "device": "cpu"}),
            },
        )
        assert r.status_code == 303 and r.headers["location"].startswith("/jobs/")
        job_id = r.headers["location"].rsplit("/", 1)[1]
        page = browser.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and job_id in page.text and "/static/js/job.js" in page.text
    wait_job(api, job_id, lambda j: j["state"] == "done", what="done", stack=stack)
