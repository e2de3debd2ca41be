import pytest

from worker.db import session_scope
from worker.models import Checkpoint, Job, User


@pytest.fixture
def make_job(sqlite_url):
    """Insert a user, a ready checkpoint and a job; returns a function taking Job field overrides."""

    def make(**fields) -> str:
        with session_scope(sqlite_url) as s:
            user = s.query(User).filter_by(name="u").one_or_none() or User(name="u")
            s.add(user)
            s.flush()
            ckpt = Checkpoint(
                owner_id=user.id, name="c", arch="resnet20", state="ready", sha256="0" * 64, size_bytes=1
            )
            s.add(ckpt)
            s.flush()
            job = Job(owner_id=user.id, checkpoint_id=ckpt.id, spec={}, total=10, **fields)
            s.add(job)
            s.flush()
            return job.id

    return make
