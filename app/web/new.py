"""Getting a job started: the teachers page (drag-and-drop upload, bundled teachers, intake status)
and the new-job form generated from the JobSpec."""

from __future__ import annotations

import json
import shutil
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import select

from app.api.checkpoints import BundledCheckpointIn, checkpoint_out, receive_checkpoint, send_intake
from app.api.checkpoints import add_bundled as api_add_bundled
from app.api.jobs import enqueue, owned_job, ready_checkpoint
from app.auth import Principal
from app.bundled import manifest
from app.bundled import names as bundled_names
from app.sessions import CSRF_FIELD
from app.web import specform
from app.web.render import check_csrf, render, require_login
from dfq.models.names import arch_family, arch_names
from dfq.spec import BUDGET_PRESETS, METHOD_PRESETS, QUANT_PRESET_NEEDS, QUANT_PRESETS, JobSpec
from worker.models import Checkpoint

router = APIRouter(include_in_schema=False)


def _checkpoints(request: Request, principal: Principal) -> list[Any]:
    with request.app.state.sessions() as session:
        rows = session.execute(
            select(Checkpoint)
            .where(Checkpoint.owner_id == principal.user_id)
            .order_by(Checkpoint.created_at.desc())
            .limit(100)
        ).scalars()
        return [checkpoint_out(c) for c in rows]


def _teachers_page(
    request: Request, principal: Principal, error: str | None = None, status_code: int = 200
) -> Response:
    archs = [{"name": n, "family": arch_family(n)} for n in arch_names()]
    context = {
        "checkpoints": _checkpoints(request, principal),
        "bundled": manifest(),
        "archs": archs,
        "max_upload": request.app.state.settings.max_upload_bytes,
        "error": error,
        "nav": "teachers",
    }
    return render(request, "teachers.html", context, status_code)


@router.get("/teachers", response_class=HTMLResponse)
def teachers(request: Request) -> Response:
    return _teachers_page(request, require_login(request))


@router.post("/ui/checkpoints")
async def upload(request: Request) -> Response:
    """The upload form without JavaScript (the page's script posts to the API with a progress bar)."""
    principal = await anyio.to_thread.run_sync(require_login, request)
    received = await receive_checkpoint(request, request.app.state.settings, principal)
    if isinstance(received, JSONResponse):
        body = json.loads(received.body)
        detail = body["detail"] if isinstance(body["detail"], str) else body["detail"][0]["msg"]
        return await anyio.to_thread.run_sync(
            _teachers_page, request, principal, f"upload refused: {detail}", received.status_code
        )
    ckpt, fields = received
    try:
        check_csrf(request, fields.get(CSRF_FIELD))
    except HTTPException:
        shutil.rmtree(request.app.state.settings.checkpoints_dir / ckpt.id, ignore_errors=True)
        raise

    def insert() -> None:
        with request.app.state.sessions() as session:
            session.add(ckpt)
            session.commit()
            send_intake(request, session, ckpt)

    await anyio.to_thread.run_sync(insert)
    return RedirectResponse("/teachers", status_code=303)


@router.post("/ui/checkpoints/bundled")
def add_bundled(
    request: Request,
    name: Annotated[str, Form()],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/teachers",
) -> Response:
    principal = require_login(request)
    check_csrf(request, csrf_token)
    with request.app.state.sessions() as session:
        try:
            ckpt = api_add_bundled(
                BundledCheckpointIn(name=name), request, request.app.state.settings, principal, session
            )
        except HTTPException as exc:
            msg = exc.detail if isinstance(exc.detail, str) else exc.detail[0]["msg"]
            return _teachers_page(request, principal, msg, exc.status_code)
    if next == "/jobs/new":  # back to the form with the new teacher chosen (enabled once it is ready)
        return RedirectResponse(f"/jobs/new?checkpoint={ckpt.id}", status_code=303)
    return RedirectResponse("/teachers", status_code=303)


# ------------------------------------------------------------------------------------------ new job


def _form_page(
    request: Request,
    principal: Principal,
    values: dict[str, str],
    blocks: list[str],
    errors: dict[str, list[str]] | None = None,
    status_code: int = 200,
    cloned_from: str | None = None,
) -> Response:
    context = {
        "checkpoints": _checkpoints(request, principal),
        "bundled": bundled_names(),
        "values": values,
        "blocks": blocks,
        "errors": errors or {},
        "sections": specform.sections(),
        "block_titles": {k: t for k, (_, t) in specform.BLOCKS.items()},
        "method_presets": METHOD_PRESETS,
        "budget_presets": specform.budget_presets(),
        "budget_names": list(BUDGET_PRESETS),
        "quant_presets": specform.quant_presets(),
        "quant_names": list(QUANT_PRESETS),
        "quant_needs": QUANT_PRESET_NEEDS,
        "eval_sets": specform.EVAL_SETS,
        "devices": specform.DEVICES,
        "cloned_from": cloned_from,
        "nav": "new",
    }
    return render(request, "new_job.html", context, status_code)


@router.get("/jobs/new", response_class=HTMLResponse)
def new_job_form(request: Request, checkpoint: str | None = None, clone: str | None = None) -> Response:
    """Empty (defaults), or filled with another job's spec: the dashboard's clone button."""
    principal = require_login(request)
    spec = None
    if clone:
        with request.app.state.sessions() as session:
            original = owned_job(session, principal, clone)
            spec, checkpoint = original.spec, checkpoint or original.checkpoint_id
    values, blocks = specform.form_values(spec)
    if checkpoint:
        values["checkpoint_id"] = checkpoint
    return _form_page(request, principal, values, blocks, cloned_from=clone)


@router.post("/ui/jobs")
async def new_job(request: Request) -> Response:
    principal = await anyio.to_thread.run_sync(require_login, request)
    form = await request.form()
    items = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
    values = dict(items)  # the last value wins (a ticked checkbox follows its hidden "false")
    blocks = [v for k, v in items if k == "method.blocks" and v in specform.BLOCKS]
    check_csrf(request, values.get(CSRF_FIELD))
    cloned_from = values.get("cloned_from") or None
    return await anyio.to_thread.run_sync(_create, request, principal, values, blocks, cloned_from)


def _create(
    request: Request, principal: Principal, values: dict[str, str], blocks: list[str], cloned_from: str | None
) -> Response:
    def again(errors: dict[str, list[str]], status_code: int) -> Response:
        return _form_page(request, principal, values, blocks, errors, status_code, cloned_from)

    try:
        spec = JobSpec.model_validate(specform.spec_data(values, blocks))
    except specform.FormErrors as exc:
        return again(exc.errors, 422)
    except ValidationError as exc:
        return again(specform.validation_errors(exc), 422)
    with request.app.state.sessions() as session:
        try:
            if cloned_from:
                owned_job(session, principal, cloned_from)
            ckpt = ready_checkpoint(session, principal, values.get("checkpoint_id", ""))
            job = enqueue(request, session, principal, spec, ckpt, cloned_from=cloned_from)
        except HTTPException as exc:
            if isinstance(exc.detail, list):
                names = specform.known_names()
                errors: dict[str, list[str]] = {}
                for e in exc.detail:
                    errors.setdefault(specform.error_field(tuple(e["loc"][1:]), names), []).append(e["msg"])
                return again(errors, exc.status_code)
            return again({"": [str(exc.detail)]}, exc.status_code)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)
