"""Settings the worker needs (database, broker, data directory, retry and throttling knobs).

They live here rather than in ``app/settings.py`` because the worker reads them too and imports only
point down (``dfq/ <- worker/ <- app/``); ``app.settings.Settings`` extends this class with the
API's own knobs. Every field is read from a ``DFQ_*`` environment variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.retry import RetryPolicy


class WorkerSettings(BaseSettings):
    """Knobs shared by the API and the worker processes."""

    model_config = SettingsConfigDict(env_prefix="DFQ_", extra="ignore")

    data_dir: Path = Field(Path(".dfq-data"), description="uploads, job directories, embedded DB and broker")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file in data_dir (embedded mode)"
    )
    broker_url: str | None = Field(
        None, description="Celery broker; default: kombu filesystem transport under data_dir (no server)"
    )
    redis_url: str | None = Field(
        None, description="Redis for live events (pub/sub); default: the broker when it is Redis, else none"
    )
    max_attempts: int = Field(3, ge=1, description="runs of one job before it is failed (worker deaths)")
    visibility_timeout_s: int = Field(
        7 * 24 * 3600, ge=60, description="Redis redelivery timeout; must exceed the longest job"
    )
    heartbeat_s: float = Field(5.0, gt=0, description="how often a running job refreshes its heartbeat")
    stale_after_s: float = Field(
        60.0, gt=0, description="a running job whose heartbeat is older than this is presumed dead"
    )
    progress_interval_s: float = Field(1.0, ge=0, description="minimum seconds between progress writes")
    publish_interval_s: float = Field(0.2, ge=0, description="minimum seconds between published step events")
    cancel_poll_s: float = Field(1.0, ge=0, description="minimum seconds between reads of the cancel flag")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads in a job process")
    preload_engine: bool = Field(
        True, description="import torch/dfq in the worker parent (no CUDA init) so forked jobs start fast"
    )
    filesystem_poll_s: float = Field(0.05, gt=0, description="polling interval of the filesystem broker")
    db_retry_attempts: int = Field(
        8, ge=1, description="tries of a worker's database write before the attempt fails (transient errors)"
    )
    db_retry_base_s: float = Field(
        0.5, gt=0, description="first backoff between those tries; doubles each time"
    )
    db_retry_max_s: float = Field(10.0, gt=0, description="longest backoff between two tries")
    intake_memory_mb: int = Field(
        4096, ge=16, description="memory the process that parses an upload may map (RLIMIT_AS headroom)"
    )
    intake_cpu_s: int = Field(120, ge=1, description="CPU-seconds limit of that process (RLIMIT_CPU)")
    intake_timeout_s: float = Field(300.0, gt=0, description="wall-clock limit; the process is then killed")

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.db_retry_attempts, self.db_retry_base_s, self.db_retry_max_s)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'dfq.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def resolved_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        url = self.resolved_broker_url
        return url if url.startswith(("redis://", "rediss://")) else None

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def checkpoints_dir(self) -> Path:
        return (self.data_dir / "checkpoints").resolve()

    @property
    def jobs_dir(self) -> Path:
        return (self.data_dir / "jobs").resolve()


@lru_cache
def get_worker_settings() -> WorkerSettings:
    """The process-wide settings, read once from the environment."""
    return WorkerSettings()
