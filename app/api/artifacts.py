"""Artifacts of a job: list (``[{name, url}]``) and download, behind the owner check."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse
from sqlalchemy import select

from app.api.jobs import owned_job
from app.deps import PrincipalDep, SessionDep, SettingsDep
from app.schemas import ArtifactOut
from worker.models import Artifact

router = APIRouter(prefix="/api/v1/jobs", tags=["artifacts"])
MEDIA_TYPES = {".json": "application/json", ".png": "image/png", ".jsonl": "application/x-ndjson"}


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job_id: str, request: Request, principal: PrincipalDep, session: SessionDep):
    """Quantized safetensors, report.json, sample grids (and attention maps, where a method makes them)."""
    owned_job(session, principal, job_id)
    rows = session.execute(
        select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
    ).scalars()
    return [
        ArtifactOut(
            name=a.name,
            url=str(request.url_for("download_artifact", job_id=job_id, name=a.name)),
            kind=a.kind,
            size_bytes=a.size_bytes,
            partial=a.partial,
        )
        for a in rows
    ]


@router.get("/{job_id}/artifacts/{name:path}", name="download_artifact")
def download_artifact(
    job_id: str, name: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
):
    owned_job(session, principal, job_id)
    row = session.execute(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    ).scalar_one_or_none()
    root = (settings.jobs_dir / job_id).resolve()
    path = (root / name).resolve()
    if row is None or not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {name!r} for job {job_id}")
    return FileResponse(
        path,
        media_type=MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream"),
        filename=Path(name).name,
    )
