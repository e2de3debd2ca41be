"""Database engine and sessions, shared by the API and the worker processes.

SQLite (embedded mode) is shared by several processes (the API and two workers), so it runs in WAL
mode with a generous busy timeout; PostgreSQL needs nothing special.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite the file's directory is created first."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


_engines: list[Engine] = []


@lru_cache(maxsize=8)
def session_factory(url: str) -> sessionmaker[Session]:
    """One engine and session factory per URL and process (forked workers build their own)."""
    engine = make_engine(url)
    _engines.append(engine)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def forget_inherited_connections() -> None:
    """In a freshly forked process: drop the parent's pooled connections without closing them (they
    still belong to the parent), so this process opens its own."""
    for engine in _engines:
        engine.dispose(close=False)
    _engines.clear()
    session_factory.cache_clear()
