"""Faults injected into a running production-shaped stack (API, gpu and intake Celery workers,
Redis, PostgreSQL; real processes): Redis restarted, the API killed and restarted, PostgreSQL
unreachable for the workers, all while a job runs. Each time the job must end ``done`` with every
step's metrics recorded exactly once. (Worker SIGKILLs and cancels: tests/e2e/test_service.py.)"""

from __future__ import annotations

import contextlib
import signal
import time

import httpx
import pytest

from tests.e2e.specs import BUNDLED, FAULT_SPEC, SMOKE
from tests.e2e.stack import start_proxied
from tests.faults import RedisServer

pytestmark = pytest.mark.slow
TERMINAL = {"done", "failed", "cancelled"}


@pytest.fixture(scope="module")
def faults(tmp_path_factory, postgres_url):
    """The stack, a restartable private Redis, and a proxy that can cut the workers' database."""
    tmp = tmp_path_factory.mktemp("faults")
    with contextlib.ExitStack() as es:
        redis = RedisServer()
        redis.start()
        es.callback(redis.close)
        stack, proxy = start_proxied(tmp, redis.url, postgres_url)
        es.callback(proxy.close)
        es.callback(stack.stop)
        yield stack, redis, proxy


@pytest.fixture(scope="module")
def client(faults):
    stack = faults[0]
    with httpx.Client(base_url=stack.base_url, headers=stack.token("faults"), timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def teacher(faults, client):
    r = client.post("/api/v1/checkpoints", files={"file": BUNDLED.read_bytes()}, data={"arch": "resnet20"})
    assert r.status_code == 202, r.text
    return poll(client, f"/api/v1/checkpoints/{r.json()['id']}", lambda c: c["state"] != "pending", faults[0])


def poll(client, path, until, stack, timeout=300) -> dict:
    """GET ``path`` until ``until(body)``; connection errors (the API may be down) are waited out."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            r = client.get(path)
            if r.status_code == 200:
                last = r.json()
                if until(last):
                    return last
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out on {path}; last: {last}\n{stack.logs()}")


def run_with_fault(client, teacher, stack, inject) -> dict:
    """Start a job, call ``inject()`` once it has logged a few steps, follow it to the end."""
    r = client.post("/api/v1/jobs", json={"checkpoint_id": teacher["id"], "spec": FAULT_SPEC})
    assert r.status_code == 201, r.text
    path = f"/api/v1/jobs/{r.json()['id']}"
    poll(client, path, lambda j: j["state"] == "running" and j["step"] >= 3, stack)
    inject()
    return poll(client, path, lambda j: j["state"] in TERMINAL, stack)


def assert_complete(client, job) -> None:
    assert job["state"] == "done", job["error"]
    steps = [p["step"] for p in client.get(f"/api/v1/jobs/{job['id']}/metrics?kind=step").json()]
    assert steps == list(range(1, job["total"] + 1))  # every step once: nothing lost, nothing doubled
    names = {a["name"] for a in client.get(f"/api/v1/jobs/{job['id']}/artifacts").json()}
    assert {"quantized.safetensors", "report.json", "metrics.jsonl"} <= names


def test_redis_restarted_mid_job(faults, client, teacher):
    stack, redis, _ = faults
    job = run_with_fault(client, teacher, stack, redis.restart)
    assert_complete(client, job)
    assert redis.restarts == 1
    # the broker works again: a new job is delivered and runs
    r = client.post("/api/v1/jobs", json={"checkpoint_id": teacher["id"], "spec": SMOKE})
    assert r.status_code == 201, r.text
    assert_complete(
        client, poll(client, f"/api/v1/jobs/{r.json()['id']}", lambda j: j["state"] in TERMINAL, stack)
    )


def test_api_killed_and_restarted_mid_job(faults, client, teacher):
    stack = faults[0]

    def restart_api() -> None:
        stack.restart("api", signal.SIGKILL)
        stack.wait_healthy()

    assert_complete(client, run_with_fault(client, teacher, stack, restart_api))


def test_postgres_unreachable_for_the_workers_mid_job(faults, client, teacher):
    stack, _, proxy = faults

    def outage() -> None:
        proxy.cut()
        time.sleep(5)  # longer than several progress writes: they must wait and retry
        proxy.restore()

    job = run_with_fault(client, teacher, stack, outage)
    assert_complete(client, job)
    assert job["attempts"] == 1  # ridden out by retries, not by re-running the job
    logs = " ".join(line["message"] for line in client.get(f"/api/v1/jobs/{job['id']}/logs").json())
    assert "could not record" not in logs
    assert "retry" in (stack.procs["gpu"].log.read_text(errors="replace"))  # the retries happened
