"""Log in with an API token, log out. The login form is CSRF-protected by a double-submit cookie."""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from app import sessions
from app.web.render import render


def _safe_next(next_url: str | None) -> str:
    """Only local paths: a login link must not be able to send the user to another site."""
    if not next_url or not next_url.startswith("/") or next_url.startswith("//") or "\\" in next_url:
        return "/"
    return next_url


router = APIRouter(include_in_schema=False)


def _form(request: Request, next_url: str, error: str | None = None, status_code: int = 200) -> Response:
    nonce = secrets.token_urlsafe(24)
    response = render(
        request, "login.html", {"error": error, "next": next_url, "login_csrf": nonce}, status_code
    )
    response.set_cookie(
        sessions.LOGIN_COOKIE, nonce, max_age=3600, httponly=True, samesite="lax",
        secure=request.app.state.settings.secure_cookies,
    )  # fmt: skip
    return response


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    return _form(request, _safe_next(next))


@router.post("/login")
def login(
    request: Request,
    token: Annotated[str, Form()],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    target = _safe_next(next)
    expected = request.cookies.get(sessions.LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected, csrf_token):
        return _form(request, target, "the login form expired; please try again", 403)
    with request.app.state.sessions() as session:
        principal = request.app.state.verifier.verify(session, token.strip())
    if principal is None or principal.token_id is None:
        return _form(request, target, "unknown or revoked token", 401)
    s = request.app.state.settings
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        sessions.SESSION_COOKIE,
        sessions.issue(request.app.state.secret_key, principal.token_id, principal.user_id, s.session_max_age_s),
        max_age=s.session_max_age_s, httponly=True, samesite="lax", secure=s.secure_cookies,
    )  # fmt: skip
    response.delete_cookie(sessions.LOGIN_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    from app.web.render import check_csrf

    check_csrf(request, csrf_token)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(sessions.SESSION_COOKIE)
    return response
