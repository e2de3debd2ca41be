"""`dfq serve` brings back a worker process that dies: on the embedded stack nothing else would, and
every later job would stay queued. (On the redis-postgres stack compose/systemd restart workers.)"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.e2e.specs import SMOKE
from tests.e2e.stack import start_embedded
from tests.e2e.test_service import start_job, wait_job
from tests.services import wait_until


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_embedded(tmp_path_factory.mktemp("supervision"))
    yield s
    s.stop()


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` and their command lines, from /proc."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return out


def _gpu_worker(serve_pid: int) -> int | None:
    pids = [p for p, cmd in _children(serve_pid).items() if "--queues gpu" in cmd]
    return pids[0] if len(pids) == 1 else None


def test_a_killed_worker_is_restarted_and_the_next_job_runs(stack):
    serve = stack.procs["serve"]
    wait_until(lambda: _gpu_worker(serve.popen.pid) is not None, 60, "gpu worker started")
    first = _gpu_worker(serve.popen.pid)
    os.kill(first, signal.SIGKILL)  # as the OOM killer would
    wait_until(lambda: b"worker 'gpu'" in serve.log.read_bytes(), 30, "serve notices the dead worker")
    assert f"(pid {first}) died with status -9".encode() in serve.log.read_bytes()
    wait_until(lambda: _gpu_worker(serve.popen.pid) not in (None, first), 60, "a new gpu worker")
    with httpx.Client(base_url=stack.base_url, headers=stack.token("alice"), timeout=30) as api:
        r = api.post("/api/v1/checkpoints/bundled", json={"name": "resnet20_fmnist"})
        assert r.status_code == 202, r.text
        ckpt = r.json()
        deadline = time.monotonic() + 120
        while (ckpt := api.get(f"/api/v1/checkpoints/{ckpt['id']}").json())["state"] == "pending":
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.1)
        assert ckpt["state"] == "ready", ckpt["error"]
        job = start_job(api, ckpt, SMOKE)
        job = wait_job(api, job["id"], lambda j: j["state"] == "done", what="done", stack=stack)
    assert job["attempts"] == 1
