"""Checkpoints: streamed upload (size cap, SHA-256), intake on the ``intake`` queue, list/get/delete."""

from __future__ import annotations

import shutil
from typing import Annotated

import anyio
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Principal
from app.deps import PrincipalDep, SessionDep, SettingsDep
from app.owned import owned
from app.quota import quota_message, remaining_bytes
from app.schemas import DB_INT_MAX, BundledCheckpointIn, CheckpointOut, Page
from app.settings import Settings
from app.upload import UploadError, receive_upload
from worker.celery_app import INTAKE_TASK
from worker.models import Checkpoint, Job, new_id

router = APIRouter(prefix="/api/v1/checkpoints", tags=["checkpoints"])
UPLOAD_FILE = "upload.bin"


def checkpoint_out(c: Checkpoint) -> CheckpointOut:
    return CheckpointOut(
        id=c.id, state=c.state, error=c.error, name=c.name, arch=c.arch, sha256=c.sha256,
        size_bytes=c.size_bytes, info=c.info, created_at=c.created_at,
    )  # fmt: skip


def owned_checkpoint(session: Session, principal: Principal, checkpoint_id: str) -> Checkpoint:
    return owned(session, principal, Checkpoint, checkpoint_id, "checkpoint")


def _floats(text: str | None, field: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise UploadError(422, f"{field} must be numbers separated by commas", field) from None


def parse_options(fields: dict[str, str]) -> dict:
    """Optional preprocessing of the teacher: input_size ('28' or '28x28'), mean and std per channel."""
    opts: dict = {}
    if fields.get("input_size"):
        try:
            parts = [int(p) for p in fields["input_size"].lower().replace("x", " ").split()]
        except ValueError:
            raise UploadError(422, "input_size must look like 28 or 28x28", "input_size") from None
        if not 1 <= len(parts) <= 2 or min(parts) < 1:
            raise UploadError(422, "input_size must look like 28 or 28x28", "input_size")
        opts["input_size"] = parts * 2 if len(parts) == 1 else parts
    for key in ("mean", "std"):
        values = _floats(fields.get(key), key)
        if values is not None:
            opts[key] = values
    return opts


def upload_error_response(exc: UploadError) -> JSONResponse:
    """413/415/400 as ``{"detail": message}``; 422 in FastAPI's field-level shape."""
    if exc.status == 422:
        detail = [{"loc": ["body", exc.field or "body"], "msg": exc.message, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


def send_intake(request: Request, session: Session, ckpt: Checkpoint) -> None:
    """Queue the intake task; if the broker is unreachable, keep nothing and answer 503."""
    try:
        request.app.state.celery.send_task(
            INTAKE_TASK, args=[ckpt.id], retry=True, retry_policy={"max_retries": 2}
        )
    except Exception as exc:
        session.delete(ckpt)
        session.commit()
        shutil.rmtree(request.app.state.settings.checkpoints_dir / ckpt.id, ignore_errors=True)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"broker unavailable, nothing stored: {exc}"
        ) from None


async def store_upload(
    request: Request, settings: Settings, principal: Principal
) -> Checkpoint | JSONResponse:
    """Receive the multipart body into a new checkpoint directory; the ``pending`` row to insert."""
    received = await receive_checkpoint(request, settings, principal)
    return received if isinstance(received, JSONResponse) else received[0]


async def _quota_left(request: Request, settings: Settings, principal: Principal) -> int | None:
    def work() -> int | None:
        with request.app.state.sessions() as session:
            return remaining_bytes(session, principal.user_id, settings.user_quota_bytes)

    return await anyio.to_thread.run_sync(work)


async def receive_checkpoint(
    request: Request, settings: Settings, principal: Principal
) -> tuple[Checkpoint, dict[str, str]] | JSONResponse:
    """:func:`store_upload` plus the form's text fields (the dashboard's form carries its CSRF token)."""
    ckpt_id = new_id()
    folder = settings.checkpoints_dir / ckpt_id
    cap, quota_left = settings.max_upload_bytes, await _quota_left(request, settings, principal)
    if quota_left is not None and quota_left < cap:
        cap = max(quota_left, 1)  # 413 past what the user may still store
    try:
        try:
            up = await receive_upload(request, folder / UPLOAD_FILE, cap, settings.upload_chunk_bytes)
        except UploadError as exc:
            if exc.status == 413 and cap != settings.max_upload_bytes:
                used = settings.user_quota_bytes - (quota_left or 0)
                raise UploadError(413, quota_message(settings.user_quota_bytes, used)) from None
            raise
        arch = up.fields.get("arch", "").strip()
        if not arch:
            raise UploadError(422, "arch is required: a registry name such as resnet20 or resnet18", "arch")
        options = parse_options(up.fields)
    except UploadError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        return upload_error_response(exc)
    name = (up.fields.get("name") or up.filename or "checkpoint").strip()[:200]
    ckpt = Checkpoint(
        id=ckpt_id, owner_id=principal.user_id, name=name, arch=arch, state="pending", sha256=up.sha256,
        size_bytes=up.size, upload_path=str(up.path), options=options,
    )  # fmt: skip
    return ckpt, up.fields


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=CheckpointOut,
    responses={
        413: {"description": "upload larger than DFQ_MAX_UPLOAD_BYTES or the user's disk quota"},
        422: {"description": "missing field"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "arch"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "arch": {"type": "string", "description": "registry name, e.g. resnet20"},
                            "name": {"type": "string"},
                            "input_size": {"type": "string", "description": "e.g. 28 or 28x28"},
                            "mean": {"type": "string", "description": "per channel, comma separated"},
                            "std": {"type": "string", "description": "per channel, comma separated"},
                        },
                    }
                }
            },
            "required": True,
        }
    },
)
async def upload_checkpoint(request: Request, settings: SettingsDep, principal: PrincipalDep):
    """Upload a teacher checkpoint (safetensors or a torch.save'd state_dict); it is ``pending``
    until the intake task has validated it against ``arch`` and stored it as safetensors."""
    ckpt = await store_upload(request, settings, principal)
    if isinstance(ckpt, JSONResponse):
        return ckpt
    return await _insert_and_queue(request, ckpt)


async def _insert_and_queue(request: Request, ckpt: Checkpoint) -> CheckpointOut:
    def work() -> CheckpointOut:
        with request.app.state.sessions() as session:
            session.add(ckpt)
            session.commit()
            send_intake(request, session, ckpt)
            return checkpoint_out(ckpt)

    return await anyio.to_thread.run_sync(work)


@router.post("/bundled", status_code=status.HTTP_202_ACCEPTED, response_model=CheckpointOut)
def add_bundled(
    body: BundledCheckpointIn,
    request: Request,
    settings: SettingsDep,
    principal: PrincipalDep,
    session: SessionDep,
):
    """Register one of the bundled teachers (see `dfq teachers`) as your checkpoint: a first job
    needs no file at hand."""
    from app.bundled import bundled_entry, copy_bundled

    entry = bundled_entry(body.name)
    if entry is None:
        raise HTTPException(
            422,
            [{"loc": ["body", "name"], "msg": f"no bundled teacher {body.name!r}", "type": "value_error"}],
        )
    ckpt_id = new_id()
    path, size, sha = copy_bundled(entry, settings.checkpoints_dir / ckpt_id / UPLOAD_FILE)
    ckpt = Checkpoint(
        id=ckpt_id, owner_id=principal.user_id, name=body.name, arch=entry["arch"], state="pending", sha256=sha,
        size_bytes=size, upload_path=str(path), options={},
    )  # fmt: skip
    session.add(ckpt)
    session.commit()
    send_intake(request, session, ckpt)
    return checkpoint_out(ckpt)


@router.get("", response_model=Page[CheckpointOut])
def list_checkpoints(
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    state: Annotated[str | None, Query(description="pending | ready | rejected")] = None,
    limit: Annotated[int, Query(ge=1, le=DB_INT_MAX)] = 50,
    offset: Annotated[int, Query(ge=0, le=DB_INT_MAX)] = 0,
):
    limit = min(limit, settings.page_size_max)
    q = select(Checkpoint).where(Checkpoint.owner_id == principal.user_id)
    if state:
        q = q.where(Checkpoint.state == state)
    total = session.execute(select(func.count()).select_from(q.subquery())).scalar_one()
    rows = session.execute(q.order_by(Checkpoint.created_at.desc()).limit(limit).offset(offset)).scalars()
    return Page[CheckpointOut](
        items=[checkpoint_out(c) for c in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{checkpoint_id}", response_model=CheckpointOut)
def get_checkpoint(checkpoint_id: str, principal: PrincipalDep, session: SessionDep):
    return checkpoint_out(owned_checkpoint(session, principal, checkpoint_id))


@router.delete("/{checkpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_checkpoint(
    checkpoint_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
):
    """Delete a checkpoint and its files; refused (409) while jobs still refer to it."""
    c = owned_checkpoint(session, principal, checkpoint_id)
    used = session.execute(select(func.count()).where(Job.checkpoint_id == c.id)).scalar_one()
    if used:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"checkpoint is used by {used} job(s); delete those first"
        )
    session.delete(c)
    session.commit()
    shutil.rmtree(settings.checkpoints_dir / c.id, ignore_errors=True)
