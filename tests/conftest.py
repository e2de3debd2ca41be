"""Session-wide real services for the worker, app and e2e tests (see tests/services.py)."""

from __future__ import annotations

import pytest

from tests import services


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis: the machine's (DB 15) or a private instance for the run."""
    with services.redis_service() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL: the machine's (database test, schema dfq_test) or a private cluster."""
    with services.postgres_service() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    """A fresh SQLite database at the newest schema (migrated the way the service does it)."""
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'dfq.db'}"
    upgrade(url)
    return url


@pytest.fixture
def random_checkpoint(tmp_path):
    """A ResNet-20 (1 input channel) with non-trivial BN statistics, saved as safetensors."""
    import torch

    from dfq.models.checkpoint import save_state_dict
    from dfq.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 1, 28, 28))
    path = tmp_path / "r20.safetensors"
    save_state_dict(model.state_dict(), path)
    return path
