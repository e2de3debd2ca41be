"""The ``dfq`` command: the engine's subcommands (``quantize``, ``teachers``, ...) plus the service's.

``dfq serve`` runs the embedded default (SQLite, filesystem broker, workers started alongside the
API, everything under ``--data-dir``); ``DFQ_DATABASE_URL`` / ``DFQ_BROKER_URL`` switch it to
PostgreSQL and Redis, where ``dfq serve --no-worker`` and separate ``dfq worker`` processes run.
This lives in app/ because the engine's CLI must not import the service.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dfq.cli import build_parser as build_engine_parser

WORKER_POOLS = (("gpu", "gpu"), ("intake", "intake"))  # (queues, name) of the workers `serve` starts


def _apply_common(args: argparse.Namespace) -> None:
    """Command-line options become DFQ_* variables, so child processes see the same settings."""
    if getattr(args, "data_dir", None):
        os.environ["DFQ_DATA_DIR"] = str(Path(args.data_dir).resolve())
    from app.settings import get_settings
    from worker.config import get_worker_settings

    get_settings.cache_clear()
    get_worker_settings.cache_clear()


def _ensure_schema() -> None:
    from app.migrate import upgrade
    from app.settings import get_settings

    upgrade(get_settings().resolved_database_url)


def _first_token() -> str | None:
    """A token for user ``admin`` when the database has none yet, so a fresh install can log in."""
    from sqlalchemy import func, select

    from app.auth import create_token
    from app.settings import get_settings
    from worker.db import session_scope
    from worker.models import ApiToken

    with session_scope(get_settings().resolved_database_url) as s:
        if s.execute(select(func.count()).select_from(ApiToken)).scalar_one():
            return None
        return create_token(s, "admin")


def worker_command(queues: str, concurrency: int = 1, loglevel: str = "info") -> list[str]:
    """How `dfq serve` starts a worker (the same subcommand docker-compose and the tests run)."""
    return [
        sys.executable,
        "-m",
        "app.cli",
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
    ]


def _die_with_parent() -> None:
    """In a worker started by `dfq serve`: get SIGTERM if serve itself dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM the workers (warm shutdown), then SIGKILL: a killed job is resumed from its saved
    state when the service starts again (the reaper re-queues it)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _asked_to_stop(returncode: int) -> bool:
    """A worker that exits 0 or by SIGTERM/SIGINT was stopped on purpose (Ctrl-C reaches the whole
    process group); anything else (SIGKILL by the OOM killer, a crash) is a death to repair."""
    return returncode in (0, -signal.SIGTERM, -signal.SIGINT)


def supervise(
    procs: list[subprocess.Popen],
    commands: list[list[str]],
    stop: threading.Event,
    poll_s: float = 1.0,
    min_uptime_s: float = 30.0,
    base_delay_s: float = 1.0,
    max_delay_s: float = 60.0,
) -> None:
    """Restart the workers `dfq serve` started when one dies, until ``stop`` is set.

    Without this, one dead worker process leaves every later job queued forever on the embedded
    stack (there is no compose or systemd around it). The job the dead worker held is recovered by the
    reaper (re-queued from its checkpoint); this only brings back a process to run it. A worker that dies
    again within ``min_uptime_s`` of its start waits twice as long before the next restart (from
    ``base_delay_s`` up to ``max_delay_s``), so a worker that cannot start does not spin. ``procs`` is updated in place, so the
    caller's shutdown stops the current processes.
    """
    started = [time.monotonic()] * len(procs)
    quick_deaths = [0] * len(procs)
    while not stop.wait(poll_s):
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code is None or _asked_to_stop(code):
                continue
            quick_deaths[i] = quick_deaths[i] + 1 if time.monotonic() - started[i] < min_uptime_s else 0
            delay = min(max_delay_s, base_delay_s * 2.0 ** quick_deaths[i])
            cmd = commands[i]
            name = cmd[cmd.index("--queues") + 1] if "--queues" in cmd else cmd[-1]
            print(
                f"dfq: worker '{name}' (pid {proc.pid}) died with status {code}; restarting it in {delay:.0f} s",
                flush=True,
            )
            if stop.wait(delay):
                return
            procs[i] = subprocess.Popen(commands[i], preexec_fn=_die_with_parent)
            started[i] = time.monotonic()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.port:
        os.environ["DFQ_PORT"] = str(args.port)
    if args.host:
        os.environ["DFQ_HOST"] = args.host
    _apply_common(args)
    from app.main import create_app
    from app.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_schema()
    token = _first_token()
    url = f"http://{settings.host}:{settings.port}/"
    if token:
        print(
            f"dfq: first start: created user 'admin'. Log in at {url} with this token (shown once):\n\n    {token}\n",
            flush=True,
        )
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    supervisor = None
    if not args.no_worker:
        # Same process group as serve: stopping serve's group stops its workers and their jobs.
        commands = [worker_command(q) for q, _ in WORKER_POOLS]
        procs = [subprocess.Popen(c, preexec_fn=_die_with_parent) for c in commands]
        supervisor = threading.Thread(target=supervise, args=(procs, commands, stop), daemon=True)
        supervisor.start()
    print(
        f"dfq: serving {url} (data in {settings.data_dir.resolve()}, database {settings.resolved_database_url.split('@')[-1]})",
        flush=True,
    )
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    finally:
        stop.set()
        if supervisor is not None:
            supervisor.join(timeout=30)
        _stop(procs)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    _apply_common(args)
    import worker.tasks  # noqa: F401  (registers the tasks)
    from worker.celery_app import app

    queues = args.queues.replace(" ", "")
    argv = [
        "worker", "--queues", queues, "--concurrency", str(args.concurrency), "--pool", "prefork",
        "--max-tasks-per-child", "1", "--loglevel", args.loglevel, "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--hostname", f"{queues.replace(',', '+')}-{os.getpid()}@%h",
    ]  # fmt: skip
    app.worker_main(argv)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    _apply_common(args)
    from app.auth import create_token
    from app.settings import get_settings
    from worker.db import session_scope

    _ensure_schema()
    with session_scope(get_settings().resolved_database_url) as s:
        token = create_token(s, args.name)
    print(token)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    _apply_common(args)
    _ensure_schema()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The engine's parser extended with ``serve``, ``worker``, ``token create`` and ``migrate``."""
    p = build_engine_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--data-dir", help="uploads, jobs, embedded DB and broker (DFQ_DATA_DIR; default .dfq-data)"
        )

    s = sub.add_parser("serve", help="run the API (and, embedded, its workers)")
    s.add_argument("--port", type=int, help="TCP port (DFQ_PORT; default 8000)")
    s.add_argument("--host", help="bind address (DFQ_HOST; default 127.0.0.1)")
    data_dir(s)
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere: `dfq worker`)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a Celery worker (queues intake and gpu)")
    w.add_argument("--queues", default="intake,gpu", help="comma-separated: intake, gpu")
    w.add_argument("--concurrency", type=int, default=1, help="jobs at once (one per GPU)")
    w.add_argument("--loglevel", default="info")
    data_dir(w)
    w.set_defaults(func=cmd_worker)

    t = sub.add_parser("token", help="API tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="create a token for user NAME and print it (stored hashed)")
    tc.add_argument("name")
    data_dir(tc)
    tc.set_defaults(func=cmd_token_create)

    m = sub.add_parser("migrate", help="alembic upgrade head")
    data_dir(m)
    m.set_defaults(func=cmd_migrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
