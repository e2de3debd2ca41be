"""The test-infrastructure helpers: detection of running services and the private fallbacks."""

from __future__ import annotations

import socket

import pytest
import redis

from tests import services


def test_is_listening_sees_an_open_and_a_closed_port():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert services.is_listening("127.0.0.1", port)
    assert not services.is_listening("127.0.0.1", port)


def test_redis_answers_only_for_redis():
    with socket.socket() as srv:  # a TCP listener that is not Redis
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert not services.redis_answers("127.0.0.1", port, timeout=0.3)
    assert not services.redis_answers("127.0.0.1", services.free_port())


def test_force_private_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DFQ_TEST_PRIVATE_SERVICES", raising=False)
    assert not services.force_private()
    monkeypatch.setenv("DFQ_TEST_PRIVATE_SERVICES", "1")
    assert services.force_private()


def test_sqlalchemy_url_puts_the_test_schema_first():
    url = services.sqlalchemy_url("postgresql://postgres@127.0.0.1:5432/test")
    assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:5432/test?")
    assert "search_path%3Ddfq_test" in url


def test_postgres_as_root_runs_as_the_postgres_user(monkeypatch):
    monkeypatch.setattr(services.os, "geteuid", lambda: 0)
    assert services._as_postgres_user(["initdb"])[:3] == ["runuser", "-u", "postgres"]
    monkeypatch.setattr(services.os, "geteuid", lambda: 1000)
    assert services._as_postgres_user(["initdb"]) == ["initdb"]
    assert services.sudo_prefix() == ["sudo"]


def test_private_redis_starts_on_a_free_port_and_stops():
    """The fresh-machine path, for real: a private redis-server (installed from Debian if missing)."""
    with services.private_redis() as url:
        client = redis.Redis.from_url(url)
        assert client.ping()
        port = client.connection_pool.connection_kwargs["port"]
        assert port != 6379
    assert not services.is_listening("127.0.0.1", port)


@pytest.mark.slow
def test_private_postgres_starts_on_a_free_port_and_stops():
    import psycopg

    with services.private_postgres() as url:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "test"
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not services.is_listening("127.0.0.1", port)


def test_session_services_are_real(redis_url, postgres_url):
    import sqlalchemy

    assert redis.Redis.from_url(redis_url).ping()
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT current_schema()")).scalar() == services.PG_SCHEMA
    engine.dispose()
