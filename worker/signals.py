"""Worker process hooks: preload the engine before fork, reset DB pools after it, reap dead jobs.

Preloading imports torch and the engine in the parent so that each job's freshly forked process
starts in milliseconds; it never touches CUDA (asserted), which would not survive the fork.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready

from worker.celery_app import GPU_QUEUE, QUANTIZE_TASK
from worker.config import get_worker_settings
from worker.db import forget_inherited_connections, session_scope

log = logging.getLogger(__name__)


@worker_init.connect
def preload_engine(**_: Any) -> None:
    settings = get_worker_settings()
    if not settings.preload_engine:
        return
    import torch

    import dfq.job
    import dfq.models.teachers  # noqa: F401

    if torch.cuda.is_initialized():  # pragma: no cover - would be a bug in an import
        raise RuntimeError("CUDA was initialised in the worker parent; it would not survive fork")


@worker_process_init.connect
def fresh_process(**_: Any) -> None:
    forget_inherited_connections()
    threads = get_worker_settings().torch_threads
    if threads:
        import torch

        torch.set_num_threads(threads)


@worker_ready.connect
def reap_on_start(sender: Any = None, **_: Any) -> None:
    """Jobs whose worker died with this host (or went silent) are re-queued when a GPU worker starts."""
    queues = {q.name for q in sender.app.amqp.queues.consume_from.values()} if sender else set()
    if GPU_QUEUE not in queues:
        return
    from worker.ownership import reap_dead_jobs

    settings = get_worker_settings()
    try:
        with session_scope(settings.resolved_database_url) as s:
            changed = reap_dead_jobs(
                s, settings.stale_after_s, lambda job_id: sender.app.send_task(QUANTIZE_TASK, args=[job_id])
            )
        if changed:
            log.warning("re-queued or closed %d job(s) whose worker had died: %s", len(changed), changed)
    except Exception:
        log.exception("reaping dead jobs failed (the API's reaper will retry)")
    forget_inherited_connections()
