"""``budget.idle_generator``: a job whose student no generator image can reach leaves the steps out.

The claim to hold: the student is the same, bit for bit, with the steps run and without them.
"""

import json

import pytest
import torch

from dfq.job import run_job
from dfq.models.teachers import load_bundled
from dfq.pipeline import Pipeline
from dfq.spec import JobSpec

# no student step (warm-up to the end); MobileNetV2's 35 activation sites all follow a BN
CALIBRATE = {"preset": "smoke", "epochs": 2, "iters_per_epoch": 2, "batch_size": 8, "warmup_epochs": 2}
BN_RANGES = {"act_clip": "bn-mse", "act_ste": "clipped", "act_equalize": "depthwise"}


def _spec(budget=None, quant=None, **extra):
    return JobSpec.model_validate(
        {
            "bits": "W4A4",
            "budget": {**CALIBRATE, **(budget or {})},
            "quant": {**BN_RANGES, **(quant or {})},
            "device": "cpu",
            "seed": 3,
            **extra,
        }
    )


@pytest.fixture(scope="module")
def mnv2():
    return load_bundled("mobilenetv2_fmnist")


@pytest.fixture(scope="module")
def bn_ranged(mnv2):
    return _pipe(_spec(), mnv2)


def _pipe(spec, mnv2):
    model, info = mnv2
    return Pipeline(spec, model, info.num_classes, info.input_shape, "cpu")


def test_the_student_is_the_same_with_the_steps_and_without(mnv2):
    trained = _pipe(_spec({"idle_generator": "train"}), mnv2)
    g_before = {k: v.clone() for k, v in trained.generator.state_dict().items()}
    trained.run()
    assert trained.idle_generator() is None and trained.steps_run == 4
    assert any(not torch.equal(v, g_before[k]) for k, v in trained.generator.state_dict().items())

    skipped = _pipe(_spec(), mnv2)
    events = []
    skipped.run(events.append)
    assert skipped.history["generator_skipped"]["steps"] == 4 and skipped.steps_run == 0
    assert skipped.step == skipped.total  # a resume finds the loop done
    assert [(e.kind, e.phase) for e in events] == [("phase", "ranges")]  # no step, no samples
    a, b = trained.student.state_dict(), skipped.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("budget", "quant", "idle"),
    [
        ({}, {}, True),
        ({}, {"weight_round": "squant"}, True),  # rounds without images
        ({"warmup_epochs": 1}, {}, False),  # the student takes steps on the generator's images
        ({}, {"act_clip": "minmax", "act_equalize": "none"}, False),  # ranges calibrated on its images
        ({}, {"weight_round": "adaround"}, False),  # rounding learnt on its images
        ({}, {"bias_correct": True}, False),  # shifts measured on its images
        ({"idle_generator": "train"}, {}, False),
    ],
)
def test_only_a_generator_nothing_reads_is_left_out(mnv2, bn_ranged, budget, quant, idle):
    spec = _spec(budget, quant)
    if spec.quant.act_clip == "bn-mse":  # the same student: only the spec the check reads differs
        bn_ranged.spec = spec
        why = bn_ranged.idle_generator()
    else:
        why = _pipe(spec, mnv2).idle_generator()
    assert (why is not None) == idle
    if idle:
        assert why == (
            "no student step, all 35 activation ranges from the teacher's BN, and nothing after training "
            "reads the generator's images"
        )


def test_resnet20_keeps_its_generator():
    # 9 of its 19 sites follow a residual add, not a BN: their ranges come from the generator's images
    model, info = load_bundled("resnet20_fmnist")
    pipe = Pipeline(_spec(), model, info.num_classes, info.input_shape, "cpu")
    assert pipe.idle_generator() is None


def test_the_report_and_model_card_say_so(tmp_path, mnv2):
    spec = _spec(eval="fashion-mnist", eval_limit=200)
    report = run_job(spec, mnv2, tmp_path)
    assert report["iterations"] == 0 and report["student_steps"] == 0
    assert report["generator_skipped"]["steps"] == 4
    assert (
        json.loads((tmp_path / "report.json").read_text())["generator_skipped"] == report["generator_skipped"]
    )
    assert not any(tmp_path.glob("samples/*.png"))
    card = (tmp_path / "report.md").read_text()
    assert "The generator's 4 steps were left out (`budget.idle_generator: skip`)" in card
    assert "no generator weights, sample grid or attention maps" in card
    assert not any((tmp_path / f).exists() for f in ("generator.safetensors", "samples.png", "attention.png"))
    assert (tmp_path / "quantized.safetensors").exists()
    assert report["q_top1"] > 50  # the BN ranges alone, as a `calibrate` job gives them
