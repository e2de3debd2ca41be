"""The Celery application, configured for hour-long GPU jobs.

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job's message is acknowledged only when the
  task returns, and re-queued if the process running it dies, so a crash is retried (the job row's
  attempt counter, not Celery, decides when to give up).
- ``worker_prefetch_multiplier=1`` and concurrency 1: a worker reserves one job at a time, so queued
  jobs wait for a free worker rather than behind a busy one.
- broker ``visibility_timeout`` above the longest job: Redis would otherwise hand a still-running
  job's message to a second worker.
- ``worker_max_tasks_per_child=1``: every job runs in a fresh forked process, so GPU memory and any
  leaked state are returned to the system when the job ends; the parent never initialises CUDA
  (it may import torch, which does not touch the GPU), because CUDA does not survive a fork.
- JSON only: task arguments are ids, never pickles.

Queues: ``intake`` (CPU: validating uploads) and ``gpu`` (quantization jobs).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker import fs_broker
from worker.config import WorkerSettings, get_worker_settings

INTAKE_TASK, QUANTIZE_TASK = "dfq.intake", "dfq.quantize"
INTAKE_QUEUE, GPU_QUEUE = "intake", "gpu"


def transport_options(settings: WorkerSettings) -> dict[str, Any]:
    """Broker options: filesystem folders for the embedded default, visibility timeout for Redis."""
    if settings.resolved_broker_url.startswith("filesystem"):
        fs_broker.install()
        queue, control = settings.broker_dir / "queue", settings.broker_dir / "control"
        for folder in (queue, control):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "control_folder": str(control),
            "polling_interval": settings.filesystem_poll_s,
        }
    return {"visibility_timeout": settings.visibility_timeout_s}


def make_celery(settings: WorkerSettings) -> Celery:
    """A Celery app for ``settings`` (the API builds one per app instance; workers use ``app``)."""
    app = Celery("dfq", broker=settings.resolved_broker_url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_routes={INTAKE_TASK: {"queue": INTAKE_QUEUE}, QUANTIZE_TASK: {"queue": GPU_QUEUE}},
        task_default_queue=GPU_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_celery(get_worker_settings())
