"""Request and response bodies of the REST API (the OpenAPI contract pipelines script against)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from dfq.spec import JobSpec

HEADLINE_KEYS = (
    "method", "bits", "layers", "budget", "seed", "fp_top1", "q_top1", "agreement",
    "agreement_synthetic", "wall_s", "it_per_s", "device", "resumed_from_step",
)  # fmt: skip

# Integers in queries end up in SQL; past 32 bits some backends overflow (SQLite raised a 500 when
# the fuzzer sent offset=1e23), so every integer parameter is bounded here, a 422 instead.
DB_INT_MAX = 2**31 - 1


class CheckpointOut(BaseModel):
    id: str
    state: str = Field(description="pending | ready | rejected")
    error: str | None = None
    name: str
    arch: str
    sha256: str
    size_bytes: int
    info: dict[str, Any] | None = Field(None, description="input shape, normalisation, classes (once ready)")
    created_at: datetime


class BundledCheckpointIn(BaseModel):
    name: str = Field(description="a bundled teacher, e.g. resnet20_fmnist")


class JobCreate(BaseModel):
    checkpoint_id: str
    spec: JobSpec = Field(
        description="a JobSpec; the shorthand is accepted, e.g. {'bits': 'W4A4', 'budget': 'smoke'}"
    )


class JobClone(BaseModel):
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="merged into the original spec, e.g. {'bits': 'W3A3', 'seed': 1}"
    )
    checkpoint_id: str | None = Field(None, description="another checkpoint (default: the original's)")


class JobOut(BaseModel):
    id: str
    state: str = Field(description="queued | running | done | failed | cancelled")
    phase: str | None
    step: int
    total: int
    eta_s: float | None = Field(description="seconds left at the current pace (running jobs)")
    metrics: dict[str, Any] = Field(description="the latest logged step metrics")
    error: str | None
    error_phase: str | None = Field(description="the phase in which the job failed")
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker: str | None = Field(description="host:pid of the attempt running it")
    checkpoint_id: str
    cloned_from: str | None
    spec: dict[str, Any]
    result: dict[str, Any] | None = Field(description="headline of the report (done jobs)")
    pinned: bool = Field(False, description="kept by the retention policy (POST .../pin)")
    artifacts_expired_at: datetime | None = Field(None, description="when retention removed its files")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class LogLine(BaseModel):
    id: int
    time: datetime
    level: str
    message: str


class MetricPointOut(BaseModel):
    step: int
    epoch: int
    kind: str = Field(description="step (losses, diagnostics) | eval (accuracy)")
    time: datetime
    values: dict[str, float | None] = Field(description="None where the value was NaN or infinite")


class ArtifactOut(BaseModel):
    name: str
    url: str
    kind: str
    size_bytes: int
    partial: bool = Field(False, description="left by a cancelled run (no final model)")
