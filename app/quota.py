"""Per-user disk quota: what a user's checkpoints and job artifacts occupy, against a cap.

Checked before an upload is streamed (the upload's own cap becomes what is left) and before a job
is queued (a job writes artifacts), so a full disk is a clear 413/403 for the one user over quota,
not a failed write for everybody. Sizes come from the database rows, which the worker keeps
current as it registers files, so the check costs two SUM queries rather than a directory walk.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.models import Artifact, Checkpoint


def usage_bytes(session: Session, user_id: int) -> int:
    """Bytes held by ``user_id``: uploaded checkpoints plus the artifacts of their jobs."""
    ckpts = session.execute(
        select(func.coalesce(func.sum(Checkpoint.size_bytes), 0)).where(Checkpoint.owner_id == user_id)
    ).scalar_one()
    arts = session.execute(
        select(func.coalesce(func.sum(Artifact.size_bytes), 0)).where(Artifact.owner_id == user_id)
    ).scalar_one()
    return int(ckpts) + int(arts)


def remaining_bytes(session: Session, user_id: int, quota: int) -> int | None:
    """Bytes the user may still store (None: no quota)."""
    return None if quota <= 0 else max(quota - usage_bytes(session, user_id), 0)


def quota_message(quota: int, used: int) -> str:
    return (
        f"disk quota exceeded: {used} of {quota} bytes used; delete finished jobs or unused "
        "checkpoints (DELETE /api/v1/jobs/ID, /api/v1/checkpoints/ID)"
    )


def quota_exceeded(session: Session, user_id: int, quota: int) -> str | None:
    """The message for a user at or over quota, else None."""
    if quota <= 0:
        return None
    used = usage_bytes(session, user_id)
    return quota_message(quota, used) if used >= quota else None
