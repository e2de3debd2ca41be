"""The exact commands the tests run to start the service, which docker-compose.yml must also run."""

from __future__ import annotations

MIGRATE = ["alembic", "upgrade", "head"]
GPU_WORKER = ["dfq", "worker", "--queues", "gpu"]
INTAKE_WORKER = ["dfq", "worker", "--queues", "intake"]


def api(host: str, port: int) -> list[str]:
    """The API without embedded workers (workers are separate processes/containers)."""
    return ["dfq", "serve", "--no-worker", "--host", host, "--port", str(port)]


def embedded(port: int, data_dir: str) -> list[str]:
    """The README's embedded default: API + workers, SQLite + filesystem broker."""
    return ["dfq", "serve", "--port", str(port), "--data-dir", data_dir]
