"""Browser sessions and CSRF tokens: the dashboard's login on top of the API's tokens.

A person logs in once with an API token; the browser then holds a signed session cookie naming that
token's row (never the token itself), so a stolen cookie jar does not leak a credential that works
with curl, and revoking the token ends its browser sessions too (each request re-checks the row).
The cookie is HMAC-signed with the service's secret key (``DFQ_SECRET_KEY``, or a random key kept
in ``data_dir/secret_key``) and expires after ``session_max_age_s``.

Cookies ride along on cross-site requests, so every state-changing request authenticated by the
session must carry a CSRF token derived from it: a hidden ``csrf_token`` field in forms, the
``X-CSRF-Token`` header from scripts. Bearer-token requests need none (no ambient credential).
The login form itself is protected by a double-submit cookie.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SESSION_COOKIE = "dfq_session"
LOGIN_COOKIE = "dfq_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
KEY_FILE = "secret_key"


@dataclass(frozen=True)
class BrowserSession:
    """What the session cookie says: which token row logged in, until when, and its CSRF nonce."""

    token_id: int
    user_id: int
    expires: int
    nonce: str


def load_secret_key(configured: str | None, data_dir: Path) -> bytes:
    """``DFQ_SECRET_KEY`` when set; otherwise a random key created once in ``data_dir`` (mode 600),
    so sessions survive restarts and several API processes on one data directory agree."""
    if configured:
        return configured.encode()
    path = Path(data_dir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    for _ in range(50):  # another process may have created it a moment ago and still be writing
        key = path.read_text().strip()
        if key:
            return key.encode()
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty: delete it or set DFQ_SECRET_KEY")


def _sign(key: bytes, message: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode().rstrip("=")


def issue(key: bytes, token_id: int, user_id: int, max_age_s: int) -> str:
    """A new session cookie value (a fresh nonce, so a new login gets a new CSRF token)."""
    payload = {"t": token_id, "u": user_id, "e": int(time.time()) + max_age_s, "n": secrets.token_urlsafe(16)}
    body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()
    return f"{body}.{_sign(key, body.encode())}"


def read(key: bytes, value: str | None) -> BrowserSession | None:
    """The session in a cookie value, or None when it is missing, forged, malformed or expired."""
    if not value or value.count(".") != 1:
        return None
    body, signature = value.split(".")
    if not hmac.compare_digest(signature, _sign(key, body.encode())):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body.encode()))
        session = BrowserSession(int(data["t"]), int(data["u"]), int(data["e"]), str(data["n"]))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return session if session.expires > time.time() else None


def csrf_token(key: bytes, session: BrowserSession) -> str:
    """The CSRF token of a session: deterministic (every page of the session shows the same one),
    unguessable without the key, and useless with another session."""
    return _sign(key, f"csrf:{session.nonce}:{session.token_id}".encode())


def csrf_ok(key: bytes, session: BrowserSession, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(presented, csrf_token(key, session))
