"""Owner checks: a row of another user is answered exactly like a missing one (404)."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException, status
from sqlalchemy.orm import Session

from app.auth import Principal

M = TypeVar("M")


def owned(session: Session, principal: Principal, model: type[M], row_id: str, what: str) -> M:
    """The caller's ``model`` row ``row_id``, or 404 (other users' ids are not revealed)."""
    row: Any = session.get(model, row_id)
    if row is None or row.owner_id != principal.user_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} {row_id!r}")
    return row
