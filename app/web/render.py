"""Rendering pages: one Jinja2 environment (autoescaping on), the logged-in principal, CSRF.

Every template gets ``user`` and ``csrf_token``; forms put the token in a hidden field and scripts
read it from ``<meta name="csrf-token">``. Jinja2 escapes every value, so names, errors and anything
else a user typed are shown as text; scripts only ever set ``textContent``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Request, status
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app import sessions
from app.auth import Principal
from app.deps import browser_principal

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
templates = Jinja2Templates(directory=TEMPLATES)


class LoginRequired(Exception):
    """Raised by page handlers without a valid session; answered by a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def login_url(next_url: str) -> str:
    return "/login?next=" + quote(next_url, safe="/")


def current_session(request: Request) -> sessions.BrowserSession | None:
    return sessions.read(request.app.state.secret_key, request.cookies.get(sessions.SESSION_COOKIE))


def require_login(request: Request) -> Principal:
    """The logged-in principal of a page request, or :class:`LoginRequired`."""
    browser = current_session(request)
    principal = browser_principal(request, browser) if browser else None
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target if request.method == "GET" else "/")
    request.state.principal, request.state.browser = principal, browser
    return principal


def check_csrf(request: Request, presented: str | None) -> None:
    """403 unless a form post carries this session's CSRF token."""
    browser = getattr(request.state, "browser", None) or current_session(request)
    if browser is None or not sessions.csrf_ok(request.app.state.secret_key, browser, presented):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "this form is stale or forged (bad CSRF token); reload the page"
        )


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    browser = getattr(request.state, "browser", None)
    principal = getattr(request.state, "principal", None)
    ctx = {
        "user": principal.name if principal else None,
        "csrf_token": sessions.csrf_token(request.app.state.secret_key, browser) if browser else "",
        "nav": context.pop("nav", None),
        **context,
    }
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)


# ------------------------------------------------------------------------------------------ filters


def age(value: datetime | None, now: datetime | None = None) -> str:
    """'12 s', '5 min', '3 h', '2 d' ago: what a person scanning a list wants."""
    if value is None:
        return ""
    seconds = max(0.0, ((now or datetime.now(UTC)) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def num(value: Any, digits: int = 2) -> str:
    """Numbers for tables: rounded, em dash for missing."""
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


templates.env.filters.update(age=age, duration=duration, num=num)
