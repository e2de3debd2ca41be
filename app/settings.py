"""The service's configuration: every knob from a ``DFQ_*`` environment variable.

Extends :class:`worker.config.WorkerSettings` (database, broker, data directory, retry knobs shared
with the worker processes) with what only the API needs.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from worker.config import WorkerSettings


class Settings(WorkerSettings):
    """API settings; ``DFQ_MAX_UPLOAD_BYTES=...`` etc."""

    host: str = Field("127.0.0.1", description="address `dfq serve` binds")
    port: int = Field(8000, ge=1, le=65535)
    max_upload_bytes: int = Field(4 * 2**30, ge=1, description="checkpoint uploads above this get 413")
    upload_chunk_bytes: int = Field(1 << 20, ge=4096, description="bytes read/written per upload chunk")
    reaper_interval_s: float = Field(
        30.0, gt=0, description="how often the API looks for running jobs whose worker died"
    )
    sse_poll_s: float = Field(1.0, gt=0, description="database polling interval of event streams")
    sse_ping_s: float = Field(15.0, gt=0, description="keep-alive comment interval of event streams")
    token_cache_s: float = Field(10.0, ge=0, description="how long a verified token is trusted in memory")
    page_size_max: int = Field(500, ge=1, description="largest `limit` a list endpoint accepts")
    run_migrations: bool = Field(True, description="run `alembic upgrade head` when the API starts")
    secure_cookies: bool = Field(False, description="mark the browser login cookie Secure (HTTPS)")
    secret_key: str | None = Field(
        None, description="signs browser sessions and CSRF tokens; default: a random key in data_dir"
    )
    session_max_age_s: int = Field(12 * 3600, ge=60, description="how long a browser login lasts")
    user_quota_bytes: int = Field(
        50 * 2**30, ge=0, description="disk per user (checkpoints + job artifacts); 0: unlimited"
    )
    retention_days: float = Field(
        30.0,
        ge=0,
        description="artifacts of finished, unpinned jobs and rejected uploads are removed "
        "after this many days; 0 keeps everything",
    )
    retention_interval_s: float = Field(
        3600.0, gt=0, description="how often the API applies the retention policy"
    )
    job_submit_limit: int = Field(
        30, ge=0, description="job submissions (create and clone) per token per window; 0: unlimited"
    )
    job_submit_window_s: float = Field(60.0, gt=0, description="the window of job_submit_limit")


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
