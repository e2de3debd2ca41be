"""Start and stop the real service for end-to-end tests: processes, ports, tokens, logs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.e2e import commands
from tests.faults import TcpProxy
from tests.services import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MAX_UPLOAD = 5_000_000

# Short intervals so that tests see progress, cancels and dead workers quickly (never timed).
TEST_ENV = {
    "DFQ_TORCH_THREADS": "1",
    "DFQ_HEARTBEAT_S": "0.5",
    "DFQ_STALE_AFTER_S": "30",
    "DFQ_PROGRESS_INTERVAL_S": "0.1",
    "DFQ_PUBLISH_INTERVAL_S": "0.05",
    "DFQ_CANCEL_POLL_S": "0.1",
    "DFQ_MAX_ATTEMPTS": "2",
    "DFQ_REAPER_INTERVAL_S": "1",
    "DFQ_SSE_POLL_S": "0.2",
    "DFQ_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
}


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path
    env: dict[str, str] | None = None  # overrides the stack's environment for this process

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)


@dataclass
class Stack:
    """A running service: ``kind`` is ``embedded`` (dfq serve) or ``redis-postgres``."""

    kind: str
    data_dir: Path
    env: dict[str, str]
    port: int
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.data_dir.parent / f"{self.kind}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab")
        popen = subprocess.Popen(
            argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs[name] = Proc(name, argv, popen, log, env)
        return self.procs[name]

    def restart(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Kill process ``name`` (its whole group) and start it again; returns the old log size."""
        proc = self.procs[name]
        proc.kill_group(sig)
        proc.popen.wait()
        offset = proc.log.stat().st_size
        self.start(name, proc.argv, proc.env)
        return offset

    def run(self, argv: list[str]) -> str:
        out = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{argv} failed: {out.stderr}"
        return out.stdout

    def token(self, name: str) -> dict[str, str]:
        token = self.run(["dfq", "token", "create", name]).strip().splitlines()[-1]
        assert token.startswith("dfq_")
        return {"Authorization": f"Bearer {token}"}

    def wait_healthy(self, timeout: float = 120) -> None:
        def ok() -> bool:
            for p in self.procs.values():
                if p.popen.poll() is not None:
                    raise RuntimeError(
                        f"{p.name} exited with {p.popen.returncode}:\n{p.log.read_text()[-3000:]}"
                    )
            try:
                return httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ok, timeout, f"{self.kind} API at {self.base_url}")

    def wait_worker_ready(self, name: str, timeout: float = 120, after: int = 0) -> None:
        """Celery logs 'ready.' once a worker consumes; ``after`` skips older log bytes."""
        log = self.procs[name].log
        wait_until(lambda: b" ready." in log.read_bytes()[after:], timeout, f"worker {name} ready")

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            p.kill_group(signal.SIGKILL)
            p.popen.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log.read_text(errors='replace')[-4000:]}" for p in self.procs.values()
        )


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFQ_")}
    return {
        **env,
        **TEST_ENV,
        "DFQ_DATA_DIR": str(data_dir),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    }


def start_embedded(tmp: Path, extra_env: dict[str, str] | None = None) -> Stack:
    """`dfq serve --port N --data-dir DIR`: the API plus its own workers, SQLite, filesystem broker."""
    data = tmp / "embedded-data"
    stack = Stack("embedded", data, {**base_env(data), **(extra_env or {})}, free_port())
    stack.start("serve", commands.embedded(stack.port, str(data)))
    stack.wait_healthy()
    return stack


def start_redis_postgres(
    tmp: Path,
    redis_url: str,
    postgres_url: str,
    extra_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> Stack:
    """The production shape: migrations, then the API and separate gpu/intake workers.

    ``worker_env`` overrides the environment of the two workers only (e.g. their database URL)."""
    data = tmp / "rp-data"
    env = {
        **base_env(data),
        "DFQ_DATABASE_URL": postgres_url,
        "DFQ_BROKER_URL": redis_url,
        **(extra_env or {}),
    }
    stack = Stack("redis-postgres", data, env, free_port())
    try:
        stack.run(commands.MIGRATE)
        stack.start("api", commands.api("127.0.0.1", stack.port))
        stack.start("gpu", commands.GPU_WORKER, worker_env)
        stack.start("intake", commands.INTAKE_WORKER, worker_env)
        stack.wait_healthy()
        stack.wait_worker_ready("gpu")
        stack.wait_worker_ready("intake")
    except BaseException:
        stack.stop()
        raise
    return stack


# Workers whose database is cut retry each write for up to ~20 s before giving up.
DB_RETRY_ENV = {"DFQ_DB_RETRY_ATTEMPTS": "25", "DFQ_DB_RETRY_BASE_S": "0.2", "DFQ_DB_RETRY_MAX_S": "1"}


def start_proxied(
    tmp: Path, redis_url: str, postgres_url: str, extra_env: dict[str, str] | None = None
) -> tuple[Stack, TcpProxy]:
    """The production shape with the workers' PostgreSQL behind a proxy the caller can cut.

    The API keeps its direct connection, so a database outage hits only the workers mid-job, which
    is the fault worth injecting (the API's own errors are plain 5xx). Stop both when done."""
    proxy, worker_db = TcpProxy.for_url(postgres_url)
    try:
        stack = start_redis_postgres(
            tmp, redis_url, postgres_url, extra_env, {"DFQ_DATABASE_URL": worker_db, **DB_RETRY_ENV}
        )
    except BaseException:
        proxy.close()
        raise
    return stack, proxy
