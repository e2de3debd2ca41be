"""Service load and latency, against a real uvicorn and real workers (never asserted in tests).

Measures, per stack (embedded SQLite + filesystem broker; Redis + PostgreSQL):
- requests/s and p50/p99 latency of ``GET /api/v1/jobs/{id}`` (status) and ``GET /api/v1/jobs``
  (list, 50 per page) with 50 concurrent httpx clients, over 200 stored jobs;
- submit-to-running latency: ``POST /api/v1/jobs`` until the row says ``running``, on an idle worker
  (includes forking the fresh job process and loading the teacher);
- the API process's peak RSS while a 1 GB upload streams through it.

Writes ``bench/results/service.json`` and ``.md`` and prints the table.
    .venv/bin/python bench/service.py [--stacks embedded,redis-postgres] [--seconds 10] [--upload-mb 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402
from tests.e2e.stack import Stack, start_embedded, start_redis_postgres  # noqa: E402

TINY = {
    "bits": "W4A4",
    "budget": {"preset": "smoke", "epochs": 2, "iters_per_epoch": 2, "batch_size": 8},
    "device": "cpu",
}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def seed_jobs(stack: Stack, headers: dict, checkpoint_id: str, n: int) -> list[str]:
    """Insert finished jobs straight into the database (queuing 200 real jobs would load the CPU)."""
    from sqlalchemy import select

    from worker.config import WorkerSettings
    from worker.db import session_scope
    from worker.models import Checkpoint, Job, MetricPoint, utcnow

    url = stack.env.get("DFQ_DATABASE_URL") or WorkerSettings(data_dir=stack.data_dir).resolved_database_url
    ids = []
    with session_scope(url) as s:
        owner = s.execute(select(Checkpoint.owner_id).where(Checkpoint.id == checkpoint_id)).scalar_one()
        for i in range(n):
            metrics = {"g_loss": 1.0 + i, "s_loss": 2.0, "g_bns": 0.5, "it_per_s": 3.0}
            job = Job(owner_id=owner, checkpoint_id=checkpoint_id, spec={"seed": i}, state="done", step=400, total=400,
                      metrics=metrics, attempts=1, finished_at=utcnow(), report={"q_top1": 80.0, "bits": "W4A4"})  # fmt: skip
            s.add(job)
            s.flush()
            s.add_all(
                MetricPoint(job_id=job.id, kind="step", step=k, epoch=0, values=metrics) for k in range(1, 21)
            )
            ids.append(job.id)
    return ids


async def load(base: str, headers: dict, paths: list[str], clients: int, seconds: float) -> dict:
    """``clients`` concurrent clients, each with its own connection, for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.get(random.choice(paths))
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(pct(latencies, 50) * 1000, 1),
        "p99_ms": round(pct(latencies, 99) * 1000, 1),
    }


def submit_to_running(api: httpx.Client, checkpoint_id: str, n: int, idle_s: float) -> dict:
    """Seconds from ``POST /jobs`` until the row says ``running``, ``idle_s`` after the previous
    job ended. Every job gets a fresh forked process; right after a job the pool is still replacing
    its process, so back-to-back submissions (``idle_s=0``) include that."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        job = api.post("/api/v1/jobs", json={"checkpoint_id": checkpoint_id, "spec": TINY}).json()
        while (state := api.get(f"/api/v1/jobs/{job['id']}").json()["state"]) == "queued":
            time.sleep(0.005)
        samples.append(time.perf_counter() - t0)
        assert state in ("running", "done"), state
        while api.get(f"/api/v1/jobs/{job['id']}").json()["state"] not in ("done", "failed", "cancelled"):
            time.sleep(0.05)
        time.sleep(idle_s)
    return {
        "n": n,
        "idle_s": idle_s,
        "median_s": round(statistics.median(samples), 3),
        "max_s": round(max(samples), 3),
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_load(stack: Stack, headers: dict, paths: list[str], args: argparse.Namespace) -> dict:
    """:func:`load` plus the CPU the API process and the load generator spent per request."""
    pid = api_pid(stack)
    server0, client0 = cpu_s(pid), time.process_time()
    out = asyncio.run(load(stack.base_url, headers, paths, args.clients, args.seconds))
    n = max(out["requests"], 1)
    out["server_cpu_ms_per_req"] = round((cpu_s(pid) - server0) / n * 1000, 2)
    out["client_cpu_ms_per_req"] = round((time.process_time() - client0) / n * 1000, 2)
    return out


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def upload_memory(stack: Stack, headers: dict, pid: int, mb: int) -> dict:
    """Stream ``mb`` MiB through the upload endpoint while sampling the API process's RSS."""
    peak, stop = [rss_kb(pid)], threading.Event()
    base_rss = peak[0]

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_kb(pid))
            time.sleep(0.02)

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="arch"\r\n\r\nresnet20\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
        block = os.urandom(1 << 20)
        for _ in range(mb):
            yield block
        yield b"\r\n--b--\r\n"

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    r = httpx.post(
        stack.base_url + "/api/v1/checkpoints",
        content=body(),
        headers={**headers, "content-type": "multipart/form-data; boundary=b"},
        timeout=600,
    )
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    assert r.status_code == 202, r.text
    assert r.json()["size_bytes"] == mb << 20
    return {
        "upload_mb": mb,
        "rss_before_mb": round(base_rss / 1024, 1),
        "rss_peak_mb": round(max(peak) / 1024, 1),
        "growth_mb": round((max(peak) - base_rss) / 1024, 1),
        "throughput_mb_s": round(mb / wall, 1),
    }


def api_pid(stack: Stack) -> int:
    name = "serve" if stack.kind == "embedded" else "api"
    return stack.procs[name].popen.pid


def bench_stack(kind: str, tmp: Path, args: argparse.Namespace, es: contextlib.ExitStack) -> dict:
    env = {"DFQ_MAX_UPLOAD_BYTES": str((args.upload_mb + 1) << 20), "DFQ_JOB_SUBMIT_LIMIT": "0"}
    if kind == "embedded":
        stack = start_embedded(tmp, env)
    else:
        redis_url, pg_url = (
            es.enter_context(services.redis_service()),
            es.enter_context(services.postgres_service()),
        )
        stack = start_redis_postgres(tmp, redis_url, pg_url, env)
    try:
        headers = stack.token("bench")
        api = httpx.Client(base_url=stack.base_url, headers=headers, timeout=60)
        teacher = ROOT / "teachers" / "resnet20_fmnist.safetensors"
        ckpt = api.post(
            "/api/v1/checkpoints", files={"file": teacher.read_bytes()}, data={"arch": "resnet20"}
        ).json()
        while api.get(f"/api/v1/checkpoints/{ckpt['id']}").json()["state"] == "pending":
            time.sleep(0.1)
        time.sleep(args.idle)
        out = {
            "submit_to_running": submit_to_running(api, ckpt["id"], args.submits, args.idle),
            "submit_back_to_back": submit_to_running(api, ckpt["id"], args.submits, 0.0),
        }
        ids = seed_jobs(stack, headers, ckpt["id"], 200)
        out["status"] = measured_load(stack, headers, [f"/api/v1/jobs/{i}" for i in ids], args)
        out["list"] = measured_load(
            stack, headers, ["/api/v1/jobs?limit=50", "/api/v1/jobs?limit=50&offset=50"], args
        )
        out["upload"] = upload_memory(stack, headers, api_pid(stack), args.upload_mb)
        return out
    finally:
        stack.stop()


def table(results: dict, clients: int) -> str:
    lines = [
        "| stack | endpoint | clients | req/s | p50 ms | p99 ms | errors | API CPU ms/req | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        for ep in ("status", "list"):
            x = r[ep]
            lines.append(
                f"| {kind} | {ep} | {clients} | {x['rps']} | {x['p50_ms']} | {x['p99_ms']} | {x['errors']} "
                f"| {x['server_cpu_ms_per_req']} | {x['client_cpu_ms_per_req']} |"
            )
    lines += [
        "",
        "| stack | submit-to-running, idle worker: median s | max s | back-to-back: median s | max s |",
        "|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        s, b = r["submit_to_running"], r["submit_back_to_back"]
        lines.append(f"| {kind} | {s['median_s']} | {s['max_s']} | {b['median_s']} | {b['max_s']} |")
    lines += [
        "",
        "| stack | upload MB | API RSS before MB | peak MB | growth MB | upload MB/s |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        u = r["upload"]
        lines.append(
            f"| {kind} | {u['upload_mb']} | {u['rss_before_mb']} | {u['rss_peak_mb']} | {u['growth_mb']} | {u['throughput_mb_s']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stacks", default="embedded,redis-postgres")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--submits", type=int, default=5)
    p.add_argument(
        "--idle", type=float, default=5.0, help="seconds the worker idles before a timed submission"
    )
    p.add_argument("--upload-mb", type=int, default=1024)
    p.add_argument("--name", default="service")
    args = p.parse_args()
    results = {}
    with contextlib.ExitStack() as es, tempfile.TemporaryDirectory(prefix="dfq-bench-") as tmp:
        for kind in args.stacks.split(","):
            results[kind] = bench_stack(kind, Path(tmp) / kind, args, es)
    meta = {
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, {platform.python_version()}",
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps({**meta, "clients": args.clients, "seconds": args.seconds, "results": results}, indent=2)
        + "\n"
    )
    text = table(results, args.clients)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
