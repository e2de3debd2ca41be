"""Every method preset, and all four together, run end to end on the CPU; bad combinations fail early."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from dfq.data import LabelledSet, Preprocess
from dfq.models.registry import build_model
from dfq.pipeline import Pipeline
from dfq.spec import JobSpec
from dfq.validate import SpecError, validate_for_teacher

TINY = {
    "preset": "smoke",
    "epochs": 3,
    "iters_per_epoch": 2,
    "batch_size": 8,
    "warmup_epochs": 1,
    "sample_every": 3,
}


def _calib():
    g = torch.Generator().manual_seed(0)
    return LabelledSet(torch.rand(30, 1, 28, 28, generator=g), torch.arange(30) % 10, "tiny-calib")


@pytest.mark.parametrize("method", ["dsg", "fdda", "fdda-fewshot", "acq", "lrq", "dsg+fdda+acq+lrq"])
def test_preset_runs_and_logs_its_components(method, tiny_teacher):
    spec = JobSpec.model_validate(
        {
            "method": method,
            "bits": "W4A4",
            "budget": TINY,
            "device": "cpu",
            "quant": {"calibration_epochs": 2},
        }
    )
    validate_for_teacher(spec, tiny_teacher, (1, 28, 28), 10)
    events = []
    pipe = Pipeline(
        spec,
        tiny_teacher,
        10,
        (1, 28, 28),
        "cpu",
        preprocess=Preprocess((1, 28, 28), (0.0,), (1.0,)),
        calib_set=_calib(),
    )
    pipe.run(on_event=events.append)
    steps = [e.metrics for e in events if e.kind == "step"]
    assert len(steps) == 6
    last = steps[-1]
    expect = {
        "dsg": ["g_sda", "g_sci"],
        "fdda": ["fdda_cbns", "fdda_dbns", "fdda_ce"],
        "acq": ["acq_acm", "acq_pair", "acq_consistency"],
        "lrq": ["g_ama", "s_tckd", "s_nckd"],
    }
    for name, keys in expect.items():
        if name in method:
            assert set(keys) <= set(last), (name, sorted(last))
    assert all(torch.isfinite(torch.tensor(v)) for m in steps for v in m.values())
    assert {"diag_corr", "diag_theta_y", "diag_center_spread"} <= set(last)
    samples = [e for e in events if e.kind == "samples"]
    assert samples and samples[-1].images.shape[1:] == (1, 28, 28)


def test_fewshot_fdda_trains_student_on_calibration_images(tiny_teacher):
    spec = JobSpec.model_validate({"method": "fdda-fewshot", "budget": TINY, "device": "cpu"})
    pipe = Pipeline(
        spec,
        tiny_teacher,
        10,
        (1, 28, 28),
        "cpu",
        preprocess=Preprocess((1, 28, 28), (0.0,), (1.0,)),
        calib_set=_calib(),
    )
    assert pipe.objective.calib_images.shape == (10, 1, 28, 28)  # one per class
    assert sorted(pipe.objective.calib_labels.tolist()) == list(range(10))


def test_resume_restores_method_state(tiny_teacher, tmp_path):
    spec = JobSpec.model_validate({"method": "dsg+fdda", "budget": TINY, "device": "cpu"})
    straight = Pipeline(spec, tiny_teacher, 10, (1, 28, 28), "cpu")
    straight.run()
    first = Pipeline(spec, tiny_teacher, 10, (1, 28, 28), "cpu")
    with pytest.raises(Exception, match="cancelled"):
        first.run(should_cancel=lambda: first.step == 4, checkpoint_path=tmp_path / "s.pt")
    resumed = Pipeline(spec, tiny_teacher, 10, (1, 28, 28), "cpu")
    resumed.load(tmp_path / "s.pt")
    assert resumed.objective.margins is not None and resumed.objective.centers is not None
    resumed.run()
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"method": {"preset": "fdda", "fdda": {"centers": "few-shot"}}}, "needs a labelled calibration set"),
        ({"method": "dsg", "budget": {"preset": "smoke", "warmup_epochs": 0}}, "warmup-percentile"),
        ({"method": "fdda", "budget": {"preset": "smoke", "warmup_epochs": 0}}, "zero-shot FDDA"),
        ({"method": {"preset": "lrq", "lrq": {"ama_margin": 5}}}, "ama_margin"),
        ({"method": {"preset": "dsg", "dsg": {"sda_percentile": 101}}}, "sda_percentile"),
        ({"method": {"preset": "acq", "acq": {"pairs": 3}}}, "pairs"),
    ],
)
def test_bad_combinations_fail_at_spec_validation(spec, match):
    with pytest.raises(ValidationError, match=match):
        JobSpec.model_validate(spec)


class NoSpatialStage(nn.Module):
    """BN, but global pooling right after the stem: no feature map to take attention from."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.conv(x))).flatten(1))


def test_acq_without_a_spatial_stage_fails_before_work():
    spec = JobSpec.model_validate({"method": "acq"})
    with pytest.raises(SpecError, match=r"method\.acq: ACQ needs a teacher stage"):
        validate_for_teacher(spec, NoSpatialStage(), (1, 3, 3), 10)
    with pytest.raises(SpecError, match=r"method\.acq\.stage"):
        validate_for_teacher(
            JobSpec.model_validate({"method": {"preset": "acq", "acq": {"stage": "layer9"}}}),
            build_model("resnet20", 10, 1),
            (1, 28, 28),
            10,
        )
