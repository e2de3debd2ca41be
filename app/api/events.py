"""Server-Sent Events per job: live progress from Redis pub/sub, the job row as the fallback.

The stream opens with a ``snapshot`` of the row, then relays what the worker publishes (``phase``,
``step``, ``eval``, ``samples``, ``checkpoint``, ``state``). Without Redis (the embedded default)
or between messages, the row is polled every ``sse_poll_s`` and a ``progress`` event is sent when it
changed, so a viewer always converges on the truth. The stream ends with ``end`` once the job is
done, failed or cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.jobs import job_out, owned_job
from app.auth import Principal
from app.deps import PrincipalDep, SessionDep
from worker.events import channel
from worker.models import TERMINAL_STATES

router = APIRouter(prefix="/api/v1/jobs", tags=["events"])
SAFETY_POLL_S = 5.0  # with Redis, the row is still re-read this often in case a message was lost


def _snapshot(request: Request, principal: Principal, job_id: str) -> dict[str, Any]:
    with request.app.state.sessions() as session:
        return job_out(owned_job(session, principal, job_id)).model_dump(mode="json")


def _changed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("state", "phase", "step", "error", "cancel_requested")
    return any(a.get(k) != b.get(k) for k in keys)


def _with_relayed(row: dict[str, Any], relayed: dict[str, Any]) -> dict[str, Any]:
    """The row as a viewer should see it, given the latest step/phase relayed from pub/sub.

    The worker publishes a step at once but writes the row at most every ``progress_interval_s``, so a
    safety poll can read a row one or more steps *behind* what the stream already relayed; sent as is,
    it would move the viewer's progress backwards. While the job runs, the fresher relayed values win."""
    step = relayed.get("step")
    if row.get("state") == "running" and step is not None and (row.get("step") or 0) < step:
        return {**row, **relayed}
    return row


def _event(kind: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, default=str), event=kind)


async def job_events(request: Request, principal: Principal, job_id: str) -> AsyncIterator[ServerSentEvent]:
    settings = request.app.state.settings
    pubsub = None
    redis_client = request.app.state.async_redis()
    if redis_client is not None:
        try:
            pubsub = redis_client.pubsub()
            await pubsub.subscribe(channel(job_id))  # before the snapshot: nothing falls in between
        except Exception:
            pubsub = None
    try:
        last = await anyio.to_thread.run_sync(_snapshot, request, principal, job_id)
        yield _event("snapshot", last)
        poll_every = SAFETY_POLL_S if pubsub is not None else settings.sse_poll_s
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + poll_every
        relayed: dict[str, Any] = {}  # step and phase of the latest pub/sub message
        while last["state"] not in TERMINAL_STATES:
            if pubsub is not None:
                timeout = max(0.0, min(1.0, next_poll - loop.time()))
                try:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                except Exception:
                    pubsub, poll_every = None, settings.sse_poll_s
                    msg = None
                if msg is not None:
                    data = json.loads(msg["data"])
                    yield _event(data.pop("kind", "message"), data)
                    if data.get("step") is not None:
                        relayed = {k: data[k] for k in ("step", "phase") if k in data}
                    if data.get("state") in TERMINAL_STATES:
                        next_poll = 0.0  # confirm against the row right away
            else:
                await asyncio.sleep(max(0.0, next_poll - loop.time()))
            if loop.time() >= next_poll:
                now = _with_relayed(
                    await anyio.to_thread.run_sync(_snapshot, request, principal, job_id), relayed
                )
                if _changed(last, now):
                    yield _event("progress", now)
                last, next_poll = now, loop.time() + poll_every
        yield _event("end", {"id": job_id, "state": last["state"], "error": last["error"]})
    finally:
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


@router.get("/{job_id}/events", response_class=EventSourceResponse)
def events(job_id: str, request: Request, principal: PrincipalDep, session: SessionDep):
    """A ``text/event-stream`` of the job's progress (404 before streaming for others' jobs)."""
    owned_job(session, principal, job_id)
    ping = request.app.state.settings.sse_ping_s
    return EventSourceResponse(job_events(request, principal, job_id), ping=ping)
