"""``quant.bias_correct``: Nagel et al.'s empirical bias correction against the teacher's means."""

import json

import pytest
import torch
from torch import nn

from dfq.job import run_job
from dfq.pipeline import Event, Pipeline
from dfq.quant import quantize
from dfq.quant.bias_correct import bias_correct, correction_targets
from dfq.spec import JobSpec, QuantSpec


def _by_hand_pair():
    """conv 1x1 (no bias) -> BN -> flatten -> linear, on 1x1 images: every mean is a product."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        teacher[0].weight.copy_(torch.tensor([0.3, -0.8]).view(2, 1, 1, 1))
        teacher[1].running_mean.copy_(torch.tensor([0.5, -1.0]))
        teacher[1].running_var.copy_(torch.tensor([4.0, 0.25]))
        teacher[1].weight.copy_(torch.tensor([1.5, 0.5]))
        teacher[1].bias.copy_(torch.tensor([0.1, -0.2]))
        teacher[3].weight.copy_(torch.tensor([[0.9, -0.4], [0.25, 0.7], [-0.6, 0.05]]))
        teacher[3].bias.copy_(torch.tensor([0.0, 0.1, -0.1]))
    teacher.eval()
    student = quantize(
        teacher, QuantSpec(w_bits=2, a_bits=32, per_channel=False)
    ).eval()  # one grid: weights move
    return teacher, student


def test_targets_are_bns_fed_by_a_layer_and_biased_layers_no_bn_takes():
    _, student = _by_hand_pair()
    assert correction_targets(student, torch.ones(1, 1, 1, 1)) == {"1": "bn", "3": "bias"}


def test_by_hand():
    teacher, student = _by_hand_pair()
    x = torch.tensor([1.0, 2.0, -1.0, 6.0]).view(4, 1, 1, 1)  # mean 2
    wq = student[0].quantized_weight().detach().view(2)
    w = teacher[0].weight.detach().view(2)
    bn_shift = (wq - w) * 2.0  # E[W_q x] - E[W x]
    # after it, the BN outputs agree in mean; the linear then shifts by (L_q - L) E[bn out]
    bn_out_mean = (w * 2.0 - teacher[1].running_mean) / (teacher[1].running_var + 1e-5).sqrt()
    bn_out_mean = bn_out_mean * teacher[1].weight + teacher[1].bias
    lin_shift = ((student[3].quantized_weight() - teacher[3].weight) @ bn_out_mean).detach()
    assert bn_shift.abs().min() > 1e-3 and lin_shift.abs().min() > 1e-3  # a 2-bit grid moves both
    report = bias_correct(student, teacher, x)
    with torch.no_grad():
        assert torch.allclose(student[1].running_mean, teacher[1].running_mean + bn_shift, atol=1e-6)
        assert torch.allclose(student[3].bias, teacher[3].bias - lin_shift, atol=1e-6)
        assert torch.allclose(student(x).mean(0), teacher(x).mean(0), atol=1e-6)
    assert report["1"] == pytest.approx({"shift": float(bn_shift.abs().mean()), "kind": 0.0}, rel=1e-5)
    assert report["3"]["kind"] == 1.0


def _normalised_means(model, targets, x):
    """each BN target's input less its running mean, and the logits: what the next layers see on average"""
    seen = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, a, n=n: seen.__setitem__(n, (a[0] - m.running_mean.view(1, -1, 1, 1)).mean((0, 2, 3)))
        )
        for n, m in model.named_modules()
        if targets.get(n) == "bn"
    ]
    with torch.no_grad():
        seen["logits"] = model(x).mean(0)
    for h in hooks:
        h.remove()
    return seen


def test_every_corrected_mean_matches_the_teacher_on_a_network(tiny_teacher):
    student = quantize(tiny_teacher, QuantSpec(w_bits=3, a_bits=32)).eval()
    x = torch.randn(64, 1, 28, 28) * 0.5 + 0.2
    targets = correction_targets(student, x[:1])
    assert list(targets.values()).count("bn") == 21 and targets["fc"] == "bias"  # 21 convs, fc

    before, want = _normalised_means(student, targets, x), _normalised_means(tiny_teacher, targets, x)
    assert max((before[n] - want[n]).abs().max() for n in want) > 1e-2
    bias_correct(student, tiny_teacher, x)
    after = _normalised_means(student, targets, x)
    assert all(torch.allclose(after[n], want[n], atol=1e-4) for n in want)


def test_pipeline_corrects_once_and_a_resume_keeps_it(tiny_teacher, tiny_spec, tmp_path):
    spec = tiny_spec.model_copy(
        update={"quant": tiny_spec.quant.model_copy(update={"bias_correct": True, "bias_images": 16})}
    )
    events: list[Event] = []
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    state = tmp_path / "state.pt"
    pipe.run(events.append, checkpoint_path=state)
    assert len(pipe.history["bias_corrected"]) == 22
    assert [(e.kind, e.phase) for e in events[-2:]] == [("phase", "bias"), ("checkpoint", "bias")]
    means = {k: v.clone() for k, v in pipe.student.state_dict().items()}
    again = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    again.load(state)
    later: list[Event] = []
    again.run(later.append, checkpoint_path=state)
    assert not [e for e in later if e.phase == "bias"]
    assert all(torch.equal(v, means[k]) for k, v in again.student.state_dict().items())


def test_after_learnt_rounding_it_corrects_the_rounded_codes(tiny_teacher, tiny_spec):
    # the W3A3 recipe's order: adaround first, then the correction measured on the rounded student
    quant = {"weight_round": "adaround", "round_iters": 5, "round_images": 32, "bias_correct": True}
    spec = tiny_spec.model_copy(
        update={"quant": tiny_spec.quant.model_copy(update={**quant, "bias_images": 16})}
    )
    events: list[Event] = []
    pipe = Pipeline(spec, tiny_teacher, 10, (1, 28, 28))
    pipe.run(events.append)
    phases = [e.phase for e in events if e.kind == "phase"]
    assert phases[-2:] == ["round", "bias"]
    assert pipe.history["rounded"] and len(pipe.history["bias_corrected"]) == 22
    # on the same seeded draw, every corrected point sees the teacher's mean with the rounded codes in
    # place (a correction made before the rounding would have left the rounding's own shifts)
    images = pipe._round_images(16)
    student = pipe.student.eval()
    targets = correction_targets(student, images[:1])
    got, want = _normalised_means(student, targets, images), _normalised_means(tiny_teacher, targets, images)
    assert all(torch.allclose(got[n], want[n], atol=1e-4) for n in want)


def test_spec_and_real_data():
    assert not QuantSpec().bias_correct and QuantSpec().bias_images == 256
    real = QuantSpec(bias_correct=True, round_data="fashion-mnist-train")
    assert real.round_set == "fashion-mnist-train"
    assert JobSpec.model_validate({"quant": real.model_dump()}).real_data_used


def test_a_job_reports_the_shifts(tmp_path):
    spec = JobSpec.model_validate(
        {
            "bits": "W4A4",
            "budget": "smoke",
            "quant": {"bias_correct": True, "bias_images": 32, "weight_round": "squant"},
            "eval": "fashion-mnist",
            "eval_limit": 200,
            "device": "cpu",
        }
    )
    report = run_job(spec, "resnet20_fmnist", tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["bias_correction"] == report["bias_correction"]
    assert len(report["bias_correction"]) == 22 and report["bias_correction"]["fc"]["onto"] == "bias"
    assert all(f["shift"] > 0 for f in report["bias_correction"].values())
    assert (
        "Bias correction (`quant.bias_correct`) took the mean output shift of 22"
        in (tmp_path / "report.md").read_text()
    )
