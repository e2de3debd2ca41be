"""docker-compose.yml, validated structurally (no Docker engine here): services, images, start order,
health checks, and commands/env that agree with the settings class and with what the tests run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.settings import Settings
from tests.e2e import commands

ROOT = Path(__file__).resolve().parents[2]


class ComposeLoader(yaml.SafeLoader):
    """Compose's own ``!reset`` tag (used by the CPU override)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.load((ROOT / "docker-compose.yml").read_text(), ComposeLoader)


def test_services_and_volume(compose):
    assert {"api", "worker", "intake", "migrate", "redis", "postgres"} <= set(compose["services"])
    assert "dfqdata" in compose["volumes"]
    for name in ("api", "worker", "intake"):
        assert "dfqdata:/data" in compose["services"][name]["volumes"]
    assert compose["services"]["postgres"]["image"].startswith("postgres:")
    assert compose["services"]["redis"]["image"].startswith("redis:")
    built = compose["services"]["migrate"]["image"]
    assert all(compose["services"][n]["image"] == built for n in ("api", "worker", "intake"))


def test_commands_are_the_ones_the_tests_run(compose):
    s = compose["services"]
    assert s["migrate"]["command"] == commands.MIGRATE
    assert s["api"]["command"] == commands.api("0.0.0.0", 8000)
    assert s["worker"]["command"] == commands.GPU_WORKER
    assert s["intake"]["command"] == commands.INTAKE_WORKER


def test_start_order_and_health_checks(compose):
    s = compose["services"]
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("worker", "intake"):
        assert s[name]["depends_on"]["api"]["condition"] == "service_healthy"
    for name in ("postgres", "redis", "api", "worker", "intake"):
        assert s[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(s["api"]["healthcheck"]["test"])


def test_worker_reserves_an_nvidia_gpu_and_the_cpu_override_removes_it(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cpu = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), ComposeLoader)
    assert cpu["services"]["worker"]["deploy"] == {"__reset__": True}


def test_environment_agrees_with_the_settings_class(compose):
    env = compose["x-dfq-env"]
    fields = {f"DFQ_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    for name in ("api", "worker", "intake", "migrate"):
        assert compose["services"][name]["environment"] == env
    settings = Settings(**{k[4:].lower(): v for k, v in env.items()})
    pg = compose["services"]["postgres"]["environment"]
    assert (
        settings.resolved_database_url
        == f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert settings.resolved_broker_url.startswith("redis://redis:6379/")
    assert settings.resolved_redis_url == settings.resolved_broker_url  # live events through Redis
    assert str(settings.data_dir) == "/data"


def test_dockerfile_copies_what_the_commands_need():
    text = (ROOT / "Dockerfile").read_text()
    for path in ("dfq", "worker", "app", "migrations", "alembic.ini", "teachers"):
        assert path in text, path


def test_compose_file_validates_against_the_compose_spec():
    exe = shutil.which("check-jsonschema") or str(
        Path(__import__("sys").executable).parent / "check-jsonschema"
    )
    out = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
