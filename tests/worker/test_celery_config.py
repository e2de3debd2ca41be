"""The Celery configuration for long GPU jobs, and what the worker parent imports."""

from __future__ import annotations

import subprocess
import sys

from worker.celery_app import GPU_QUEUE, INTAKE_QUEUE, INTAKE_TASK, QUANTIZE_TASK, make_celery
from worker.config import WorkerSettings


def test_long_job_settings(tmp_path):
    conf = make_celery(
        WorkerSettings(data_dir=tmp_path, broker_url="redis://localhost:1/0", visibility_timeout_s=3600)
    ).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.worker_concurrency == 1
    assert conf.broker_transport_options == {"visibility_timeout": 3600}
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert (
        conf.task_routes[INTAKE_TASK]["queue"] == INTAKE_QUEUE
        and conf.task_routes[QUANTIZE_TASK]["queue"] == GPU_QUEUE
    )


def test_embedded_broker_needs_no_server(tmp_path):
    settings = WorkerSettings(data_dir=tmp_path)
    conf = make_celery(settings).conf
    assert conf.broker_url.startswith("filesystem://")
    opts = conf.broker_transport_options
    assert opts["data_folder_in"] == opts["data_folder_out"] and (tmp_path / "broker" / "queue").is_dir()
    assert settings.resolved_redis_url is None  # events fall back to polling
    assert settings.resolved_database_url.startswith("sqlite:///")


def test_redis_broker_doubles_as_event_bus():
    assert WorkerSettings(broker_url="redis://r:6379/0").resolved_redis_url == "redis://r:6379/0"
    assert (
        WorkerSettings(broker_url="redis://r/0", redis_url="redis://other/1").resolved_redis_url
        == "redis://other/1"
    )


def test_settings_come_from_dfq_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("DFQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DFQ_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("DFQ_TORCH_THREADS", "2")
    s = WorkerSettings()
    assert (s.data_dir, s.max_attempts, s.torch_threads) == (tmp_path, 5, 2)


def test_tasks_module_keeps_torch_out_of_the_parent_and_preload_never_touches_cuda():
    code = (
        "import sys, worker.tasks; assert 'torch' not in sys.modules, 'tasks imported torch';"
        "from worker.signals import preload_engine; preload_engine();"
        "import torch; assert 'dfq.job' in sys.modules; assert not torch.cuda.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
