"""Hostile uploads through the real intake (a limited child process per file): every one ends
``rejected`` with a reason the uploader can act on, no upload runs code, and a child that hits a
memory, CPU or wall-clock limit is stopped without taking the worker down."""

from __future__ import annotations

import re

import pytest

from tests.hostile import HOSTILE, build_all
from tests.worker import hog
from tests.worker.test_intake import _get, _pending, _settings
from worker import intake
from worker.intake import intake_checkpoint
from worker.sandbox import LimitExceeded, Limits, run_limited


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "code-ran"
    return build_all(tmp / "files", marker), marker


def test_every_hostile_upload_is_rejected_with_its_reason_and_runs_no_code(
    tmp_path, sqlite_url, hostile_files
):
    paths, marker = hostile_files
    settings = _settings(tmp_path, sqlite_url)
    outcomes = {}
    for name, path in paths.items():
        cid = _pending(settings, path)
        outcomes[name] = (intake_checkpoint(cid, settings), _get(settings, cid))
    for name, (state, row) in outcomes.items():
        pattern = HOSTILE[name][1]
        assert state == "rejected", f"{name} was {state}"
        assert row.state == "rejected" and row.path is None, name
        assert row.error and re.search(pattern, row.error), f"{name}: {row.error}"
    assert not marker.exists(), "an uploaded pickle ran a command"
    assert not list(settings.checkpoints_dir.rglob("*.safetensors")), "a rejected file was kept"
    assert not list(settings.checkpoints_dir.rglob("*.tmp"))


LIMITS = Limits(memory_bytes=256 * 2**20, cpu_s=30, timeout_s=60)


def test_a_child_over_its_memory_limit_is_reported_not_fatal():
    with pytest.raises(LimitExceeded, match="more memory"):
        run_limited(hog.memory, (), LIMITS)
    assert run_limited(hog.ok, (3,), LIMITS) == {"ok": True, "x": 3}  # the parent is fine


def test_a_child_over_its_cpu_limit_is_stopped():
    with pytest.raises(LimitExceeded, match="more than 1 s of CPU time"):
        run_limited(hog.cpu, (), Limits(2**30, cpu_s=1, timeout_s=60))


def test_a_child_past_its_wall_clock_limit_is_killed():
    with pytest.raises(LimitExceeded, match="longer than 1 s"):
        run_limited(hog.sleep, (), Limits(2**30, cpu_s=30, timeout_s=1))


def test_an_exception_in_the_child_is_raised_in_the_parent():
    with pytest.raises(RuntimeError, match="KeyError"):
        run_limited(hog.fail, (), LIMITS)


def test_intake_rejects_an_upload_whose_parse_exhausts_memory(
    tmp_path, sqlite_url, random_checkpoint, monkeypatch
):
    """A parse that allocates without bound (stood in for by a hog: the real loader refuses every
    file we could build before allocating) ends rejected with the limit, and intake carries on."""
    settings = _settings(tmp_path, sqlite_url).model_copy(
        update={"intake_memory_mb": 256, "intake_timeout_s": 60}
    )
    real = intake.validate_upload
    monkeypatch.setattr(intake, "validate_upload", lambda *args: hog.memory())
    cid = _pending(settings, random_checkpoint)
    assert intake_checkpoint(cid, settings) == "rejected"
    assert "more memory to load than intake allows (256 MiB)" in _get(settings, cid).error
    monkeypatch.setattr(intake, "validate_upload", real)
    settings = settings.model_copy(update={"intake_memory_mb": 4096})
    assert intake_checkpoint(_pending(settings, random_checkpoint), settings) == "ready"


def _from_daemon(queue) -> None:
    try:
        queue.put(run_limited(hog.ok, (7,), LIMITS))
    except Exception as exc:
        queue.put(repr(exc))


def test_the_sandbox_works_inside_a_daemonic_pool_process():
    """Celery's prefork pool processes are daemonic; multiprocessing refuses children there."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_from_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) == {"ok": True, "x": 7}
    proc.join(10)
