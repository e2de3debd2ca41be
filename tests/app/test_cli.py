"""`dfq` = the engine's commands plus the service's (`serve`, `worker`, `token create`, `migrate`)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time

from sqlalchemy import select

from app.cli import build_parser, supervise
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


def test_supervise_restarts_a_dead_worker_but_not_a_stopped_one(tmp_path):
    starts = tmp_path / "starts"
    dies = [  # a worker that is SIGKILLed right after it starts, as the OOM killer would
        sys.executable,
        "-c",
        f"import os, signal; open({str(starts)!r}, 'a').write('x'); os.kill(os.getpid(), signal.SIGKILL)",
    ]
    stops = [sys.executable, "-c", "pass"]  # exits 0: stopped on purpose
    commands = [dies, stops]
    procs = [subprocess.Popen(c) for c in commands]
    stopped = procs[1]
    stop = threading.Event()
    kwargs = {"poll_s": 0.02, "min_uptime_s": 60, "base_delay_s": 0.01, "max_delay_s": 0.2}
    thread = threading.Thread(target=supervise, args=(procs, commands, stop), kwargs=kwargs, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (starts.exists() and len(starts.read_text()) >= 4):
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert procs[1] is stopped  # a worker that exited 0 is left alone
    procs[0].wait(timeout=10)  # the last one started has written its mark
    restarts = len(starts.read_text())
    time.sleep(0.5)
    assert len(starts.read_text()) == restarts  # nothing restarts after stop
