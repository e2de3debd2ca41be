"""Device OOM: the pipeline halves the batch, records it, and finishes (dfq/oom.py).

The OOM is injected by a step that raises ``torch.OutOfMemoryError`` while the objective's batch
is larger than the device "fits"; everything else is the real pipeline.
"""

from __future__ import annotations

import pytest
import torch

from dfq import oom
from dfq.pipeline import Cancelled, Pipeline


def _pipe(spec, teacher) -> Pipeline:
    return Pipeline(spec, teacher, 10, (1, 28, 28), "cpu")


def _fits_at_most(pipe: Pipeline, limit: int) -> list[int]:
    """Make ``pipe``'s objective raise OOM for batches above ``limit``; returns the batches tried."""
    real = pipe.objective.loss
    tried: list[int] = []

    def loss(generator, in_warmup):
        batch = pipe.objective.spec.budget.batch_size
        tried.append(batch)
        if batch > limit:
            torch.empty(batch, 1024)  # something was allocated before the allocator gave up
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")
        return real(generator, in_warmup)

    pipe.objective.loss = loss
    return tried


def test_oom_halves_the_batch_records_it_and_the_run_finishes(tiny_teacher, tiny_spec):
    pipe = _pipe(tiny_spec, tiny_teacher)
    tried = _fits_at_most(pipe, 2)
    events = []
    pipe.run(on_event=events.append)
    assert pipe.step == pipe.total == 9
    assert pipe.history["oom"] == [{"step": 0, "from": 8, "to": 4}, {"step": 0, "from": 4, "to": 2}]
    assert tried[:3] == [8, 4, 2] and set(tried[3:]) == {2}
    assert pipe.spec.budget.batch_size == 8  # the job's spec (and its resumable state) is unchanged
    assert len([e for e in events if e.kind == "step"]) == 9


def test_a_resumed_run_keeps_the_reduced_batch(tiny_teacher, tiny_spec, tmp_path):
    first = _pipe(tiny_spec, tiny_teacher)
    _fits_at_most(first, 4)
    with pytest.raises(Cancelled):
        first.run(should_cancel=lambda: first.step == 3, checkpoint_path=tmp_path / "s.pt")
    resumed = _pipe(tiny_spec, tiny_teacher)
    resumed.load(tmp_path / "s.pt")
    tried = _fits_at_most(resumed, 4)
    resumed.run()
    assert resumed.history["oom"] == [{"step": 0, "from": 8, "to": 4}]
    assert set(tried) == {4}  # never retried the batch that did not fit


def test_oom_at_the_smallest_batch_fails_with_a_reason(tiny_teacher, tiny_spec):
    pipe = _pipe(tiny_spec, tiny_teacher)
    _fits_at_most(pipe, 1)
    with pytest.raises(oom.OutOfMemoryAtMinimumBatch, match="even with batch size 2"):
        pipe.run()


def test_other_errors_are_not_mistaken_for_oom(tiny_teacher, tiny_spec):
    pipe = _pipe(tiny_spec, tiny_teacher)

    def broken(generator, in_warmup):
        raise RuntimeError("shape mismatch")

    pipe.objective.loss = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        pipe.run()
    assert "oom" not in pipe.history
    assert oom.is_oom(RuntimeError("CUDA error: out of memory")) and not oom.is_oom(ValueError("x"))


def test_run_job_reports_the_halvings(tiny_teacher, tiny_spec, tmp_path, monkeypatch):
    from dfq import job as job_mod
    from dfq.models.teachers import TeacherInfo

    real_init = Pipeline.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _fits_at_most(self, 4)

    monkeypatch.setattr(Pipeline, "__init__", init)
    info = TeacherInfo(
        name="t", arch="resnet20", num_classes=10, input_shape=(1, 28, 28), mean=(0.0,), std=(1.0,)
    )
    report = job_mod.run_job(tiny_spec, (tiny_teacher, info), tmp_path / "out")
    assert report["oom_batch_halvings"] == [{"step": 0, "from": 8, "to": 4}]
    assert report["iterations"] == 9
