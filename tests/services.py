"""Real Redis and PostgreSQL for the test run: the machine's own, or private ones started here.

Where 127.0.0.1:6379 answers PING and 127.0.0.1:5432 accepts the ``postgres`` user on database
``test``, those are used (Redis DB index 15, flushed before and after; PostgreSQL schema
``dfq_test``, dropped before and after). Elsewhere (a fresh machine) the Debian packages are
installed when missing (``apt-get install -y redis-server postgresql``, with sudo when not root)
and private instances are started on free ports for the run, then stopped: never skipped.
``DFQ_TEST_PRIVATE_SERVICES=1`` forces the private path.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REDIS_DB = 15
PG_SCHEMA = "dfq_test"


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """A TCP connect succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Something on host:port speaks Redis (answers PING with +PONG)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def postgres_answers(url: str) -> bool:
    """A PostgreSQL server accepts a connection with ``url`` (libpq form)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def force_private() -> bool:
    return os.environ.get("DFQ_TEST_PRIVATE_SERVICES", "") not in ("", "0")


def sudo_prefix() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo"]


def apt_install(*packages: str) -> None:
    """Install Debian packages (what a fresh machine needs for the real-service tests)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo_prefix(), "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo_prefix(), "apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def postgres_bin_dir() -> Path | None:
    """Debian keeps initdb/pg_ctl under /usr/lib/postgresql/<version>/bin (newest first)."""
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    return Path(dirs[0]) if dirs and (Path(dirs[0]) / "initdb").exists() else None


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------- Redis


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server on a free port (installed from Debian when missing)."""
    if shutil.which("redis-server") is None:
        apt_install("redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="dfq-redis-")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: redis_answers("127.0.0.1", port), 30, "private redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def _flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


@contextlib.contextmanager
def redis_service() -> Iterator[str]:
    """The machine's Redis (DB 15, flushed before and after) or a private one."""
    if not force_private() and redis_answers("127.0.0.1", 6379):
        url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        _flush(url)
        try:
            yield url
        finally:
            _flush(url)
        return
    with private_redis() as url:
        yield url


# ---------------------------------------------------------------------------------------------- PostgreSQL


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def private_postgres() -> Iterator[str]:
    """A throw-away cluster (initdb, trust auth) on a free port, with database ``test``."""
    bindir = postgres_bin_dir()
    if bindir is None:
        apt_install("postgresql")
        bindir = postgres_bin_dir()
        if bindir is None:
            raise RuntimeError("postgresql installed but no initdb found under /usr/lib/postgresql")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dfq-pg-"))
    data = workdir / "data"
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    run = lambda cmd: subprocess.run(_as_postgres_user(cmd), check=True, capture_output=True)  # noqa: E731
    run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    opts = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    run([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(workdir / "log"), "-w", "start"])
    try:
        run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "test"])
        yield f"postgresql://postgres@127.0.0.1:{port}/test"
    finally:
        run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(workdir, ignore_errors=True)


def _reset_schema(libpq_url: str) -> None:
    import psycopg

    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {PG_SCHEMA}")


def _drop_schema(libpq_url: str) -> None:
    import psycopg

    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")


def sqlalchemy_url(libpq_url: str) -> str:
    """The SQLAlchemy URL of ``libpq_url`` with the test schema first on the search path."""
    return (
        libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)
        + f"?options=-csearch_path%3D{PG_SCHEMA}"
    )


@contextlib.contextmanager
def postgres_service() -> Iterator[str]:
    """A SQLAlchemy URL on the machine's PostgreSQL (schema dfq_test) or on a private cluster."""
    local = "postgresql://postgres@127.0.0.1:5432/test"
    if not force_private() and is_listening("127.0.0.1", 5432) and postgres_answers(local):
        _reset_schema(local)
        try:
            yield sqlalchemy_url(local)
        finally:
            _drop_schema(local)
        return
    with private_postgres() as url:
        _reset_schema(url)
        yield sqlalchemy_url(url)
