"""FastAPI dependencies: settings, a DB session per request, the calling principal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from app import sessions
from app.auth import Principal, token_from_request, unauthorized
from app.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for this request; committed explicitly by handlers that write.

    Async on purpose: creating a session does no I/O, and an async dependency saves every request
    a round trip through the thread pool (the handlers' queries still run in the pool).
    """
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


async def get_principal(request: Request) -> Principal:
    """The caller: the ``Authorization: Bearer`` token's owner, or the browser session's.

    A recently verified token is answered from memory; otherwise the lookup runs in the pool. A
    browser session (cookie) must also send its CSRF token (``X-CSRF-Token``) on unsafe methods.
    """
    token = token_from_request(request)
    if not token:
        return await _session_principal(request)
    principal = request.app.state.verifier.cached(token)
    if principal is None:
        principal = await anyio.to_thread.run_sync(_verify, request, token)
    if principal is None:
        raise unauthorized("invalid or revoked token")
    return principal


def _verify(request: Request, token: str) -> Principal | None:
    with request.app.state.sessions() as session:
        return request.app.state.verifier.verify(session, token)


async def _session_principal(request: Request) -> Principal:
    key = request.app.state.secret_key
    browser = sessions.read(key, request.cookies.get(sessions.SESSION_COOKIE))
    if browser is None:
        raise unauthorized(
            "missing token: send 'Authorization: Bearer <token>' (create one with `dfq token create NAME`)"
        )
    if request.method in sessions.UNSAFE_METHODS and not sessions.csrf_ok(
        key, browser, request.headers.get(sessions.CSRF_HEADER)
    ):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong X-CSRF-Token for this session")
    principal = await anyio.to_thread.run_sync(browser_principal, request, browser)
    if principal is None:
        raise unauthorized("the token this browser logged in with was revoked; log in again")
    return principal


def browser_principal(request: Request, browser: sessions.BrowserSession) -> Principal | None:
    """The session's principal while its token row is not revoked (and still the same user)."""
    with request.app.state.sessions() as session:
        principal = request.app.state.verifier.verify_id(session, browser.token_id)
    return principal if principal is not None and principal.user_id == browser.user_id else None


SessionDep = Annotated[Session, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
