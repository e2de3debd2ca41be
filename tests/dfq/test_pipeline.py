import pytest
import torch
from torch import nn

from dfq.pipeline import Cancelled, Pipeline
from dfq.quant import ActQuant, set_calibration


def _pipe(spec, teacher):
    return Pipeline(spec, teacher, 10, (1, 28, 28), "cpu")


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_cancel_is_bitwise_identical(tiny_teacher, tiny_spec, tmp_path):
    straight = _pipe(tiny_spec, tiny_teacher)
    straight.run()

    ckpt = tmp_path / "state.pt"
    first = _pipe(tiny_spec, tiny_teacher)
    with pytest.raises(Cancelled):
        first.run(should_cancel=lambda: first.step == 5, checkpoint_path=ckpt)
    assert ckpt.exists()
    # a fresh process would rebuild everything from scratch; so does a fresh Pipeline
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    resumed = _pipe(tiny_spec, tiny_teacher)
    resumed.load(ckpt)
    assert resumed.step == 5
    resumed.run(checkpoint_path=ckpt)
    assert _state_equal(straight.student.state_dict(), resumed.student.state_dict())
    assert _state_equal(straight.generator.state_dict(), resumed.generator.state_dict())


def test_resume_refuses_a_different_spec(tiny_teacher, tiny_spec, tmp_path):
    p = _pipe(tiny_spec, tiny_teacher)
    p.save(tmp_path / "s.pt")
    other = tiny_spec.model_copy(update={"seed": 1})
    with pytest.raises(ValueError, match="different JobSpec"):
        _pipe(other, tiny_teacher).load(tmp_path / "s.pt")


def test_events_phases_and_counts(tiny_teacher, tiny_spec):
    events = []
    _pipe(tiny_spec, tiny_teacher).run(on_event=events.append)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, 10))
    assert [e.phase for e in events if e.kind == "phase"] == ["warmup", "calibrate+finetune", "finetune"]
    samples = [e for e in events if e.kind == "samples"]
    assert [e.step for e in samples] == [2, 4, 6, 8, 9]
    assert samples[0].images.shape == (40, 1, 28, 28) and samples[0].labels.tolist()[:5] == [0, 0, 0, 0, 1]
    assert {"g_loss", "g_bns", "g_ce", "s_loss", "s_kd", "s_ce", "lr_s", "lr_g"} <= set(steps[-1].metrics)


def test_student_frozen_in_warmup_and_ranges_frozen_after_calibration(tiny_teacher, tiny_spec):
    p = _pipe(tiny_spec, tiny_teacher)
    w0 = p.student.fc.weight.detach().clone()
    g0 = p.generator.l1.weight.detach().clone()
    set_calibration(p.student, True)
    for _ in range(3):  # warm-up epoch: only G moves
        p.train_step()
        p.step += 1
    assert torch.equal(p.student.fc.weight, w0)
    assert not torch.equal(p.generator.l1.weight, g0)
    p.run()
    assert not torch.equal(p.student.fc.weight, w0)
    # calibration_epochs=2 x 3 iterations: every activation quantizer saw exactly 6 batches
    counts = {m.updates.item() for m in p.student.modules() if isinstance(m, ActQuant)}
    assert counts == {6}


def test_teacher_is_left_untouched(tiny_teacher, tiny_spec):
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    _pipe(tiny_spec, tiny_teacher).run()
    assert _state_equal(before, tiny_teacher.state_dict())


def test_teacher_without_batchnorm_is_refused(tiny_spec):
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    with pytest.raises(ValueError, match="no BatchNorm"):
        _pipe(tiny_spec, net)


def _student_step(spec, teacher, **budget):
    spec = spec.model_copy(update={"budget": spec.budget.model_copy(update=budget)})
    pipe = Pipeline(spec, teacher, 10, (1, 28, 28), "cpu")
    pipe.step = spec.budget.warmup_epochs * spec.budget.iters_per_epoch  # past warm-up: S steps
    set_calibration(pipe.student, True)
    metrics = pipe.train_step()
    grads = [p.grad for p in pipe.student.parameters() if p.grad is not None]
    return metrics, float(torch.nn.utils.get_total_norm(grads))


def test_student_gradient_norm_is_logged_and_clipped_only_when_asked(tiny_teacher, tiny_spec):
    pipe = Pipeline(tiny_spec, tiny_teacher, 10, (1, 28, 28), "cpu")
    set_calibration(pipe.student, True)
    assert "s_grad_norm" not in pipe.train_step()  # warm-up: the student has no gradient
    free, free_norm = _student_step(tiny_spec, tiny_teacher)
    assert free["s_grad_norm"] == pytest.approx(free_norm, rel=1e-6) and free_norm > 0
    clip = free_norm / 10
    clipped, clipped_norm = _student_step(tiny_spec, tiny_teacher, clip_grad_s=clip)
    # the same state and batch, so the same raw norm is logged; the step used the clipped gradient
    assert clipped["s_grad_norm"] == pytest.approx(free_norm, rel=1e-5)
    assert clipped_norm == pytest.approx(clip, rel=1e-4)


def test_a_non_finite_student_gradient_stops_the_run_before_the_step(tiny_teacher, tiny_spec):
    from dfq.pipeline import DivergedError

    pipe = Pipeline(tiny_spec, tiny_teacher, 10, (1, 28, 28), "cpu")
    pipe.step = tiny_spec.budget.warmup_epochs * tiny_spec.budget.iters_per_epoch
    set_calibration(pipe.student, True)
    pipe.train_step()  # calibrates activation ranges on a finite student
    with torch.no_grad():
        pipe.student.fc.bias[0] = float("inf")  # logits (and so the loss) become non-finite
    before = {k: v.detach().clone() for k, v in pipe.student.named_parameters()}
    with pytest.raises(DivergedError, match=rf"gradient is non-finite at step {pipe.step + 1} .*clip_grad_s"):
        pipe.train_step()
    after = dict(pipe.student.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # no SGD step was taken


def test_student_optimizer_takes_the_budgets_lr_for_the_bits(tiny_teacher, tiny_spec):
    budget = {**tiny_spec.budget.model_dump(), "lr_s": 1e-3, "lr_s_8bit": 1e-4}
    w8 = tiny_spec.model_validate(
        {**tiny_spec.canonical(), "quant": {"w_bits": 8, "a_bits": 8}, "budget": budget}
    )
    w4 = tiny_spec.model_validate({**tiny_spec.canonical(), "budget": budget})
    scaled = w8.model_validate({**w8.canonical(), "method": {**w8.canonical()["method"], "lr_s_scale": 0.5}})
    lrs = [_pipe(s, tiny_teacher).opt_s.param_groups[0]["lr"] for s in (w8, w4, scaled)]
    assert lrs == [1e-4, 1e-3, 5e-5]
