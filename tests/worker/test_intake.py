"""The intake task's body: validate an upload with the engine's safe loader, store safetensors."""

from __future__ import annotations

import pickle
import shutil

import torch

from dfq.models.checkpoint import load_state_dict
from worker.config import WorkerSettings
from worker.db import session_scope
from worker.intake import MODEL_FILE, intake_checkpoint
from worker.models import Checkpoint, User


def _pending(settings, path, arch="resnet20", options=None) -> str:
    upload = settings.checkpoints_dir / "in" / path.name
    upload.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, upload)
    with session_scope(settings.resolved_database_url) as s:
        user = s.query(User).one_or_none() or User(name="u")
        s.add(user)
        s.flush()
        c = Checkpoint(
            owner_id=user.id, name="c", arch=arch, state="pending", sha256="0" * 64, size_bytes=1,
            upload_path=str(upload), options=options or {},
        )  # fmt: skip
        s.add(c)
        s.flush()
        return c.id


def _get(settings, cid) -> Checkpoint:
    with session_scope(settings.resolved_database_url) as s:
        return s.get(Checkpoint, cid)


def _settings(tmp_path, sqlite_url) -> WorkerSettings:
    return WorkerSettings(data_dir=tmp_path / "data", database_url=sqlite_url)


def test_a_valid_checkpoint_becomes_ready_as_safetensors(tmp_path, sqlite_url, random_checkpoint):
    settings = _settings(tmp_path, sqlite_url)
    cid = _pending(
        settings, random_checkpoint, options={"input_size": [28, 28], "mean": [0.3], "std": [0.35]}
    )
    assert intake_checkpoint(cid, settings) == "ready"
    c = _get(settings, cid)
    assert c.state == "ready" and c.error is None and c.upload_path is None
    assert c.path.endswith(MODEL_FILE)
    assert c.info["input_shape"] == [1, 28, 28] and c.info["num_classes"] == 10 and c.info["mean"] == [0.3]
    stored = load_state_dict(c.path)
    original = load_state_dict(random_checkpoint)
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], original[k]) for k in stored)
    assert intake_checkpoint(cid, settings) == "ready"  # a redelivery is a no-op


def test_a_torch_save_zip_state_dict_is_accepted(tmp_path, sqlite_url, random_checkpoint):
    settings = _settings(tmp_path, sqlite_url)
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": load_state_dict(random_checkpoint)}, path)
    assert intake_checkpoint(_pending(settings, path), settings) == "ready"


def test_wrong_architecture_is_rejected_with_the_engines_message(tmp_path, sqlite_url, random_checkpoint):
    settings = _settings(tmp_path, sqlite_url)
    cid = _pending(settings, random_checkpoint, arch="resnet32")
    assert intake_checkpoint(cid, settings) == "rejected"
    c = _get(settings, cid)
    assert "does not match architecture 'resnet32'" in c.error and c.path is None


def test_unknown_architecture_is_rejected(tmp_path, sqlite_url, random_checkpoint):
    settings = _settings(tmp_path, sqlite_url)
    cid = _pending(settings, random_checkpoint, arch="no-such-net")
    assert intake_checkpoint(cid, settings) == "rejected"
    assert "unknown architecture 'no-such-net'" in _get(settings, cid).error


class Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_code_is_refused_never_run(tmp_path, sqlite_url, capsys):
    settings = _settings(tmp_path, sqlite_url)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Boom()}))
    cid = _pending(settings, path)
    assert intake_checkpoint(cid, settings) == "rejected"
    assert "pickle" in _get(settings, cid).error
    assert "pickle code ran" not in capsys.readouterr().out
