"""Alembic environment: the URL comes from the settings (DFQ_DATABASE_URL), or from
``config.attributes["url"]`` when the service runs the upgrade itself at start-up."""

from __future__ import annotations

from alembic import context

from worker.config import WorkerSettings
from worker.db import make_engine
from worker.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    url = config.attributes.get("url") or WorkerSettings().resolved_database_url
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.attributes.get("url") or WorkerSettings().resolved_database_url
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=url.startswith("sqlite")
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
