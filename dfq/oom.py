"""Surviving device out-of-memory: halve the batch, record it, carry on.

A job submitted with a batch that fits one GPU can meet a smaller or busier one. Failing an
hour-long run for that wastes the run; silently changing the recipe hides a difference in the
result. So an OOM during a training step frees what the step allocated, halves the batch the
objective samples, retries the same step, and records ``{"step", "from", "to"}`` in the run's
history (saved with the resumable state, copied into ``report.json`` as ``oom_batch_halvings``).

The pipeline's ``JobSpec`` is left untouched on purpose: the resumable state is bound to the
canonical spec, and the run is still the job the user asked for, only with a smaller batch. The
objective is given a copy of the spec whose ``budget.batch_size`` is the reduced one. A retried
step is not bit-identical to an uninterrupted one (the failed attempt may have consumed random
numbers or stepped the generator), which is why the halving is reported.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)
MIN_BATCH = 2  # BatchNorm statistics of a batch of one are meaningless
HISTORY_KEY = "oom"


class OutOfMemoryAtMinimumBatch(RuntimeError):
    """The step ran out of memory even at the smallest batch: the job cannot run on this device."""


def is_oom(exc: BaseException) -> bool:
    """True for the allocator's OOM on any device (CUDA, MPS and CPU allocators word it differently)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def current_batch(pipe: Any) -> int:
    """The batch the objective samples now (the spec's, unless an OOM reduced it)."""
    return int(pipe.objective.spec.budget.batch_size)


def set_batch(pipe: Any, batch_size: int) -> None:
    """Make the objective sample ``batch_size`` images per step; the pipeline's spec is unchanged."""
    spec = pipe.objective.spec
    if spec.budget.batch_size == batch_size:
        return
    budget = spec.budget.model_copy(update={"batch_size": batch_size})
    pipe.objective.spec = spec.model_copy(update={"budget": budget})


def restore_batch(pipe: Any) -> None:
    """After a resume: keep the reduced batch that an earlier attempt had to fall back to."""
    halvings = pipe.history.get(HISTORY_KEY) or []
    if halvings:
        set_batch(pipe, int(halvings[-1]["to"]))


def _release(pipe: Any) -> None:
    pipe.opt_g.zero_grad(set_to_none=True)
    pipe.opt_s.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_step(pipe: Any) -> dict[str, float]:
    """``pipe.train_step()``, retried at half the batch after each out-of-memory error."""
    restore_batch(pipe)
    while True:
        try:
            return pipe.train_step()
        except Exception as exc:  # only OOM is handled; anything else propagates unchanged
            if not is_oom(exc):
                raise
            old = current_batch(pipe)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # outside the except block: the traceback (and the tensors its frames hold) is released
        _release(pipe)
        new = old // 2
        if new < MIN_BATCH:
            raise OutOfMemoryAtMinimumBatch(
                f"out of memory at step {pipe.step} even with batch size {old}: {message}"
            )
        pipe.history.setdefault(HISTORY_KEY, []).append({"step": pipe.step, "from": old, "to": new})
        log.warning("out of memory at step %d with batch %d; continuing with batch %d", pipe.step, old, new)
        set_batch(pipe, new)
