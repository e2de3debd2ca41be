"""The FastAPI application: ``create_app(settings)`` wires the API, the pages and the background reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.api import artifacts, checkpoints, events, jobs
from app.auth import TokenVerifier
from app.ratelimit import SlidingWindowLimiter
from app.sessions import load_secret_key
from app.settings import Settings, get_settings
from app.web import router as pages_router
from app.web.render import LoginRequired, login_url
from worker.celery_app import QUANTIZE_TASK, make_celery
from worker.db import session_factory, session_scope
from worker.ownership import reap_dead_jobs
from worker.retention import RetentionResult, apply_retention

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def reap_once(app: FastAPI) -> list[str]:
    """Re-queue or close running jobs whose worker died (see ``worker.ownership``)."""
    s: Settings = app.state.settings
    celery = app.state.celery
    with session_scope(s.resolved_database_url) as session:
        return reap_dead_jobs(
            session, s.stale_after_s, lambda job_id: celery.send_task(QUANTIZE_TASK, args=[job_id])
        )


def retain_once(app: FastAPI) -> RetentionResult:
    """Apply the retention policy (``DFQ_RETENTION_DAYS``; pinned jobs are kept)."""
    s: Settings = app.state.settings
    with session_scope(s.resolved_database_url) as session:
        return apply_retention(session, s.jobs_dir, s.checkpoints_dir, s.retention_days)


async def _reaper(app: FastAPI) -> None:
    next_retention = 0.0
    while True:
        await asyncio.sleep(app.state.settings.reaper_interval_s)
        try:
            changed = await anyio.to_thread.run_sync(reap_once, app)
            if changed:
                log.warning("reaper re-queued or closed jobs whose worker died: %s", changed)
        except Exception:
            log.exception("reaper pass failed; will retry")
        if time.monotonic() >= next_retention:
            next_retention = time.monotonic() + app.state.settings.retention_interval_s
            try:
                removed = await anyio.to_thread.run_sync(retain_once, app)
                if removed.jobs or removed.checkpoints:
                    log.info("retention removed artifacts of %d job(s), %d rejected upload(s)",
                             len(removed.jobs), len(removed.checkpoints))  # fmt: skip
            except Exception:
                log.exception("retention pass failed; will retry")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    s: Settings = app.state.settings
    for folder in (s.data_dir, s.checkpoints_dir, s.jobs_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    if s.run_migrations:
        from app.migrate import upgrade

        await anyio.to_thread.run_sync(upgrade, s.resolved_database_url)
    task = asyncio.create_task(_reaper(app))
    try:
        yield
    finally:
        task.cancel()
        if app.state.redis is not None:
            await app.state.redis.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for ``settings`` (default: from ``DFQ_*`` environment variables)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="dfq",
        version="1",
        description="Data-free quantization as a service. Every /api/v1 call needs `Authorization: Bearer <token>` "
        "(`dfq token create NAME`).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(settings.resolved_database_url)
    app.state.celery = make_celery(settings)
    app.state.verifier = TokenVerifier(settings.token_cache_s)
    app.state.submit_limiter = SlidingWindowLimiter(settings.job_submit_limit, settings.job_submit_window_s)
    app.state.secret_key = load_secret_key(settings.secret_key, settings.data_dir)
    app.state.redis = None

    def async_redis() -> Any:
        """One shared asyncio Redis client for event streams (None in embedded mode)."""
        url = settings.resolved_redis_url
        if url and app.state.redis is None:
            import redis.asyncio

            app.state.redis = redis.asyncio.Redis.from_url(url)
        return app.state.redis

    app.state.async_redis = async_redis
    for module in (checkpoints, jobs, artifacts, events):
        app.include_router(module.router)
    app.include_router(pages_router)

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> RedirectResponse:
        return RedirectResponse(login_url(exc.next_url), status_code=303)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness plus a database round trip (used by compose's health check)."""
        from sqlalchemy import text

        with app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
