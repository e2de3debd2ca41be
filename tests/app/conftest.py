"""The API in-process (real SQLite, real filesystem broker; no worker: tasks just wait in the queue)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.auth import create_token
from app.main import create_app
from app.settings import Settings
from worker.db import session_scope
from worker.intake import intake_checkpoint

MAX_UPLOAD = 2_000_000


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data", max_upload_bytes=MAX_UPLOAD, upload_chunk_bytes=65536)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _token(settings, name):
    with session_scope(settings.resolved_database_url) as s:
        return create_token(s, name)


def login(client, token: str, next_url: str = "/jobs"):
    """A browser session for ``token``, through the login form and its CSRF token."""
    page = client.get(f"/login?next={next_url}")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)[1]
    return client.post(
        "/login", data={"token": token, "csrf_token": csrf, "next": next_url}, follow_redirects=False
    )


@pytest.fixture
def alice_token(client, settings):
    return _token(settings, "alice")


@pytest.fixture
def alice(client, settings):
    return {"Authorization": f"Bearer {_token(settings, 'alice')}"}


@pytest.fixture
def bob(client, settings):
    return {"Authorization": f"Bearer {_token(settings, 'bob')}"}


@pytest.fixture
def ready_checkpoint(client, settings, alice, random_checkpoint):
    """Alice's uploaded checkpoint, taken through the real intake code (as the worker would)."""
    with random_checkpoint.open("rb") as f:
        r = client.post(
            "/api/v1/checkpoints",
            headers=alice,
            files={"file": f},
            data={"arch": "resnet20", "input_size": "28"},
        )
    assert r.status_code == 202, r.text
    assert intake_checkpoint(r.json()["id"], settings) == "ready"
    return r.json()["id"]


def queued_messages(settings) -> int:
    return len(list((settings.broker_dir / "queue").glob("*.msg")))
