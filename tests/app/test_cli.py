"""`dfq` = the engine's commands plus the service's (`serve`, `worker`, `token create`, `migrate`)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from sqlalchemy import select

from app.cli import build_parser
from worker.config import WorkerSettings
from worker.db import session_scope
from worker.models import ApiToken, User


def test_parser_extends_the_engine_cli():
    p = build_parser()
    assert p.parse_args(["serve", "--port", "9000", "--data-dir", "d"]).port == 9000
    assert p.parse_args(["worker", "--queues", "gpu"]).queues == "gpu"
    assert p.parse_args(["token", "create", "alice"]).name == "alice"
    assert p.parse_args(["quantize", "--teacher", "t", "--out", "o"]).command == "quantize"


def test_token_create_prints_a_token_and_stores_only_its_hash(tmp_path):
    env_dir = tmp_path / "data"
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "token", "create", "carol", "--data-dir", str(env_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("dfq_") and len(token) > 40
    url = WorkerSettings(data_dir=env_dir).resolved_database_url
    with session_scope(url) as s:
        row = s.execute(select(ApiToken, User).join(User)).one()
    assert row.User.name == "carol" and row.ApiToken.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (env_dir / "dfq.db").read_bytes().decode("latin-1")
