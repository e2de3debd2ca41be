"""The dashboard: server-rendered pages (Jinja2) with progressive JavaScript, over the same tables,
owner checks and API as pipelines use. Browsers log in with a token and keep a signed session."""

from __future__ import annotations

from fastapi import APIRouter

from app.web import jobs, login, new

router = APIRouter(include_in_schema=False)
for module in (login, new, jobs):
    router.include_router(module.router)
