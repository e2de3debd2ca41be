"""Celery tasks: thin wrappers that hand an id to the code that does the work.

Nothing here imports torch at module level, so the worker parent (and the API, which only sends
tasks by name) stays free of the engine unless ``preload_engine`` asks for it; see ``signals``.
"""

from __future__ import annotations

from worker import signals  # noqa: F401  (connects the worker start-up hooks)
from worker.celery_app import INTAKE_TASK, QUANTIZE_TASK, app
from worker.config import get_worker_settings


@app.task(name=INTAKE_TASK)
def intake(checkpoint_id: str) -> str:
    """Validate an uploaded checkpoint and convert it to safetensors (queue ``intake``)."""
    from worker.intake import intake_checkpoint

    return intake_checkpoint(checkpoint_id, get_worker_settings())


@app.task(name=QUANTIZE_TASK)
def quantize(job_id: str) -> str:
    """Run or resume one quantization job (queue ``gpu``)."""
    from worker.runner import run_quantize

    return run_quantize(job_id, get_worker_settings())
