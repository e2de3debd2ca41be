"""Reliability under injected faults, against a real production-shaped stack (never asserted in tests).

Starts the API, a gpu worker and an intake worker (Celery, real processes) on PostgreSQL and a
private, restartable Redis; the workers reach PostgreSQL through a TCP proxy that can cut them off.
Then, ``--runs`` times each, while a 30-iteration CPU job runs:

- ``worker_sigkill``: SIGKILL the process running the job (expect: resumed, ``done``, 2 attempts);
- ``worker_sigkill_every_attempt``: SIGKILL every attempt (expect: ``failed`` with a reason);
- ``redis_restart``: restart redis-server (expect: ``done``);
- ``api_restart``: SIGKILL and restart the API (expect: ``done``);
- ``postgres_outage``: cut the workers' PostgreSQL connections for 5 s (expect: ``done``);
- ``cancel``: cancel the job (expect: ``cancelled``, artifacts kept and marked partial; the time
  from the cancel request to the ``cancelled`` state is recorded);
- ``hostile_upload``: upload every file of tests/hostile.py (expect: ``rejected`` with the reason,
  no command run, the API still answering).

For every ``done`` job, the step metrics must be complete (each step exactly once). Writes
``bench/results/reliability.json`` and ``.md`` and prints the table.

    .venv/bin/python bench/reliability.py [--runs 3] [--faults worker_sigkill,cancel,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import services  # noqa: E402
from tests.e2e.specs import BUNDLED  # noqa: E402
from tests.e2e.specs import FAULT_SPEC as SPEC  # noqa: E402
from tests.e2e.stack import Stack, start_proxied  # noqa: E402
from tests.faults import RedisServer, TcpProxy  # noqa: E402
from tests.hostile import HOSTILE, build_all  # noqa: E402

TERMINAL = {"done", "failed", "cancelled"}


class Bench:
    def __init__(self, stack: Stack, redis: RedisServer, proxy: TcpProxy, api: httpx.Client) -> None:
        self.stack, self.redis, self.proxy, self.api = stack, redis, proxy, api
        self.teacher_id = ""

    def get(self, path: str, timeout: float = 600, until: Callable[[dict], bool] = lambda _: True) -> dict:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                r = self.api.get(path)
                if r.status_code == 200:
                    last = r.json()
                    if until(last):
                        return last
            time.sleep(0.1)
        raise TimeoutError(f"{path}: last {last}")

    def upload(self, path: Path) -> dict:
        r = self.api.post("/api/v1/checkpoints", files={"file": path.read_bytes()}, data={"arch": "resnet20"})
        if r.status_code != 202:
            return {"state": f"http {r.status_code}", "error": r.text}
        return self.get(f"/api/v1/checkpoints/{r.json()['id']}", until=lambda c: c["state"] != "pending")

    def start_job(self) -> str:
        r = self.api.post("/api/v1/jobs", json={"checkpoint_id": self.teacher_id, "spec": SPEC})
        r.raise_for_status()
        job_id = r.json()["id"]
        self.get(f"/api/v1/jobs/{job_id}", until=lambda j: j["state"] == "running" and j["step"] >= 3)
        return job_id

    def finish(self, job_id: str) -> dict:
        job = self.get(f"/api/v1/jobs/{job_id}", until=lambda j: j["state"] in TERMINAL)
        steps = [p["step"] for p in self.api.get(f"/api/v1/jobs/{job_id}/metrics?kind=step").json()]
        arts = self.api.get(f"/api/v1/jobs/{job_id}/artifacts").json()
        complete = steps == list(range(1, job["total"] + 1))
        return {
            "job": job_id,
            "state": job["state"],
            "attempts": job["attempts"],
            "error": job["error"],
            "step": job["step"],
            "total": job["total"],
            "metric_rows": len(steps),
            "metrics_complete": complete if job["state"] == "done" else None,
            "lost_metric_rows": (job["total"] - len(set(steps))) if job["state"] == "done" else None,
            "duplicate_metric_rows": len(steps) - len(set(steps)),
            "artifacts": len(arts),
            "partial_artifacts": sum(a.get("partial", False) for a in arts),
        }

    # ------------------------------------------------------------------------------ faults

    def worker_sigkill(self) -> dict:
        job_id = self.start_job()
        job = self.api.get(f"/api/v1/jobs/{job_id}").json()
        os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        return self.finish(job_id)

    def worker_sigkill_every_attempt(self) -> dict:
        job_id, killed = self.start_job(), set()
        while True:
            job = self.get(f"/api/v1/jobs/{job_id}", until=lambda j: j["state"] in TERMINAL
                           or (j["state"] == "running" and j["worker"] not in killed and j["step"] >= 1))  # fmt: skip
            if job["state"] in TERMINAL:
                break
            killed.add(job["worker"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        return {**self.finish(job_id), "kills": len(killed)}

    def redis_restart(self) -> dict:
        job_id = self.start_job()
        self.redis.restart()
        return self.finish(job_id)

    def api_restart(self) -> dict:
        job_id = self.start_job()
        self.stack.restart("api", signal.SIGKILL)
        self.stack.wait_healthy()
        return self.finish(job_id)

    def postgres_outage(self) -> dict:
        job_id = self.start_job()
        self.proxy.cut()
        time.sleep(5)
        self.proxy.restore()
        return self.finish(job_id)

    def cancel(self) -> dict:
        job_id = self.start_job()
        t0 = time.monotonic()
        r = self.api.post(f"/api/v1/jobs/{job_id}/cancel")
        r.raise_for_status()
        self.get(f"/api/v1/jobs/{job_id}", until=lambda j: j["state"] in TERMINAL)
        ack_s = time.monotonic() - t0
        return {**self.finish(job_id), "cancel_ack_s": round(ack_s, 2)}

    def hostile_upload(self) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            marker = Path(tmp) / "code-ran"
            paths = build_all(Path(tmp) / "files", marker)
            outcomes = {name: self.upload(path) for name, path in paths.items()}
            ran = marker.exists()
        wrong = {
            n: o for n, o in outcomes.items()
            if o["state"] != "rejected" or not re.search(HOSTILE[n][1], o.get("error") or "")
        }  # fmt: skip
        up = httpx.get(self.stack.base_url + "/healthz", timeout=5).status_code == 200
        return {
            "state": "rejected" if not wrong else "accepted-or-wrong-reason",
            "files": len(outcomes),
            "rejected_with_reason": len(outcomes) - len(wrong),
            "wrong": {n: o.get("error") for n, o in wrong.items()},
            "code_ran": ran,
            "api_up": up,
        }


FAULTS = {
    "worker_sigkill": "done",
    "worker_sigkill_every_attempt": "failed",
    "redis_restart": "done",
    "api_restart": "done",
    "postgres_outage": "done",
    "cancel": "cancelled",
    "hostile_upload": "rejected",
}


def start(tmp: Path, es: contextlib.ExitStack) -> tuple[Stack, RedisServer, TcpProxy]:
    pg = es.enter_context(services.postgres_service())
    redis = RedisServer()
    redis.start()
    es.callback(redis.close)
    stack, proxy = start_proxied(tmp, redis.url, pg, {"DFQ_JOB_SUBMIT_LIMIT": "0"})
    es.callback(proxy.close)
    es.callback(stack.stop)
    return stack, redis, proxy


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for fault, runs in results.items():
        expected = FAULTS[fault]
        states = [r.get("state") for r in runs]
        done = [r for r in runs if r.get("state") == "done"]
        rows.append(
            {
                "fault": fault,
                "runs": len(runs),
                "expected": expected,
                "as_expected": sum(s == expected for s in states),
                "outcomes": ", ".join(f"{s} x{states.count(s)}" for s in sorted(set(map(str, states)))),
                "lost_metric_rows": sum(r.get("lost_metric_rows") or 0 for r in done),
                "duplicate_metric_rows": sum(r.get("duplicate_metric_rows") or 0 for r in runs),
                "errors": sorted({(r.get("error") or "")[:120] for r in runs if r.get("error")}),
                "cancel_ack_s": [r["cancel_ack_s"] for r in runs if "cancel_ack_s" in r] or None,
                "code_ran": any(r.get("code_ran") for r in runs) if fault == "hostile_upload" else None,
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Reliability under injected faults",
        "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']} (wall {meta['wall_s']} s).",
        "Stack: API + gpu worker + intake worker (Celery), PostgreSQL, a private Redis; CPU jobs of 30 iterations.",
        "",
        "| fault | runs | expected | as expected | outcomes | lost metric rows | duplicate rows | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = []
        if r["cancel_ack_s"]:
            notes.append("cancel acknowledged in " + ", ".join(f"{v:.1f}" for v in r["cancel_ack_s"]) + " s")
        if r["code_ran"] is not None:
            notes.append(f"code ran from an upload: {'YES' if r['code_ran'] else 'no'}")
        notes += [f"error: {e}" for e in r["errors"][:2]]
        lines.append(
            f"| {r['fault']} | {r['runs']} | {r['expected']} | {r['as_expected']}/{r['runs']} | {r['outcomes']} "
            f"| {r['lost_metric_rows']} | {r['duplicate_metric_rows']} | {'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability")
    args = parser.parse_args()
    t0 = time.monotonic()
    results: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as es:
        tmp = Path(es.enter_context(tempfile.TemporaryDirectory(prefix="dfq-reliability-")))
        stack, redis, proxy = start(tmp, es)
        api = es.enter_context(
            httpx.Client(base_url=stack.base_url, headers=stack.token("bench"), timeout=60)
        )
        bench = Bench(stack, redis, proxy, api)
        teacher = bench.upload(BUNDLED)
        assert teacher["state"] == "ready", teacher
        bench.teacher_id = teacher["id"]
        for fault in args.faults.split(","):
            results[fault] = []
            for i in range(args.runs):
                try:
                    outcome = getattr(bench, fault)()
                except Exception as exc:  # a harness failure is a result too, never hidden
                    outcome = {"state": "harness-error", "error": f"{type(exc).__name__}: {exc}"}
                print(f"{fault} #{i + 1}: {json.dumps(outcome)[:300]}", flush=True)
                results[fault].append(outcome)
    rows = summarize(results)
    meta = {
        "command": "python bench/reliability.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=2)
    )
    args.out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
