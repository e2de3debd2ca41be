"""API tokens: created by `dfq token create NAME`, stored as SHA-256, checked on every request.

A token is 32 random bytes (URL-safe), so a plain SHA-256 is enough (no slow hash needed: there is
nothing to brute-force). Browsers log in with a token too and then hold a signed session cookie
that names the token's row (``app.sessions``); revoking the token ends those sessions as well.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.models import ApiToken, User

TOKEN_PREFIX = "dfq_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: every query of owned rows filters on ``user_id``."""

    user_id: int
    name: str
    token_id: int | None = None  # the token row it authenticated with (browser sessions name it)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str) -> str:
    """A new token for user ``name`` (created if new); the plain token is returned once, never stored."""
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        user = User(name=name)
        session.add(user)
        session.flush()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_hash=hash_token(token), prefix=token[:10]))
    return token


class TokenVerifier:
    """Looks tokens up by hash, remembering good ones for a few seconds (the status endpoint is hot)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified less than ``ttl_s`` ago, without touching the DB."""
        with self._lock:
            hit = self._cache.get(hash_token(token))
        return hit[1] if hit and time.monotonic() - hit[0] < self.ttl_s else None

    def verify(self, session: Session, token: str) -> Principal | None:
        hit = self.cached(token)
        if hit is not None:
            return hit
        digest, now = hash_token(token), time.monotonic()
        row = session.execute(
            select(ApiToken.id, ApiToken.user_id, User.name)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.token_hash == digest, ApiToken.revoked.is_(False))
        ).first()
        if row is None:
            return None
        principal = Principal(row.user_id, row.name, row.id)
        self._remember(digest, now, principal)
        return principal

    def verify_id(self, session: Session, token_id: int) -> Principal | None:
        """The principal of token row ``token_id`` while it is not revoked (browser sessions)."""
        key = f"id:{token_id}"
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit and now - hit[0] < self.ttl_s:
            return hit[1]
        row = session.execute(
            select(ApiToken.id, ApiToken.user_id, User.name)
            .join(User, User.id == ApiToken.user_id)
            .where(ApiToken.id == token_id, ApiToken.revoked.is_(False))
        ).first()
        if row is None:
            return None
        principal = Principal(row.user_id, row.name, row.id)
        self._remember(key, now, principal)
        return principal

    def _remember(self, key: str, now: float, principal: Principal) -> None:
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now, principal)


def token_from_request(request: Request) -> str | None:
    """The ``Authorization: Bearer`` token (browsers use a session cookie instead)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})
