"""`alembic upgrade head`, run by the service at start-up (and by `dfq migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: str) -> Config:
    """The repository's ``alembic.ini`` pointed at ``url``."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (a no-op when it is already there)."""
    command.upgrade(alembic_config(url), "head")
