"""Every tensor on the job's device: the engine run on PyTorch's ``meta`` device.

CI has no GPU, and a tensor made on the host and fed to a network on the GPU fails only there: the first
GPU run (2026-12-04, an H200) stopped every job in ``Pipeline.__init__`` on a CPU probe input
(``attention.spatial_stages``). Meta tensors carry a device and a shape but no data, and every op checks
that its tensors share a device the way CUDA does (a 0-dim CPU tensor passes as a scalar, as on CUDA),
so a run on ``meta`` finds host/device mixes on a machine without a GPU.

What cannot run on ``meta`` is reading a value back: ``meta_device`` answers ``.item()``, ``.cpu()``
and the like with stand-in values. So these tests check placement, never numbers, and a branch taken
on a value is exercised for one stand-in value only. bf16 autocast has no ``meta`` device type, so it
is not covered here.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch import nn

import dfq.job
from dfq.attention import spatial_stages
from dfq.data import LabelledSet
from dfq.models.teachers import load_bundled
from dfq.pipeline import Pipeline
from dfq.spec import JobSpec

META = torch.device("meta")


def _stand_in(t: torch.Tensor) -> float | int | bool:
    """One value for any meta scalar: True for masks (``isfinite(x).all()`` guards pass), else 1 or 0.5."""
    if t.dtype == torch.bool:
        return True
    return 0.5 if t.dtype.is_floating_point else 1


@pytest.fixture
def meta_device(monkeypatch):
    """Meta tensors answer host reads with stand-ins; ``run_job`` runs on ``meta``."""
    T = torch.Tensor
    item, cpu, tolist = T.item, T.cpu, T.tolist

    def meta_item(self):
        return _stand_in(self) if self.is_meta else item(self)

    def meta_cpu(self, *args, **kwargs):
        if self.is_meta:
            return torch.full(self.shape, _stand_in(self), dtype=self.dtype)
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(T, "item", meta_item)
    monkeypatch.setattr(T, "cpu", meta_cpu)
    monkeypatch.setattr(T, "tolist", lambda self: tolist(meta_cpu(self)))
    monkeypatch.setattr(T, "__bool__", lambda self: bool(meta_item(self)))
    monkeypatch.setattr(T, "__float__", lambda self: float(meta_item(self)))
    monkeypatch.setattr(T, "__int__", lambda self: int(meta_item(self)))
    monkeypatch.setattr(dfq.job, "resolve_device", lambda name: META)
    rng = torch.get_rng_state()  # a resumed run restores RNG states: leave the next test its own
    # boolean-mask indexing on meta needs a count; assume every element is selected
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield META
    torch.set_rng_state(rng)


def _spec(method: str, **extra) -> JobSpec:
    budget = {"preset": "cpu", "batch_size": 4, "warmup_epochs": 1, "iters_per_epoch": 2, "epochs": 3}
    return JobSpec.model_validate(
        {"method": method, "bits": "W4A4", "budget": budget | {"eval_every": 1, "sample_every": 2}, **extra}
    )


def test_meta_catches_a_host_tensor_fed_to_a_device_network(meta_device):
    """The harness itself: the mix that stopped the GPU run fails here too. (A meta conv alone does not
    check its input's device; the BatchNorm after it does, as does any linear or elementwise op.)"""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).to(meta_device)
    with pytest.raises(RuntimeError, match="device"):
        net(torch.zeros(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="device"):
        nn.Linear(3, 2).to(meta_device)(torch.zeros(1, 3))
    assert net(torch.zeros(1, 1, 8, 8, device=meta_device)).shape == (1, 2, 6, 6)


def test_spatial_stages_probe_runs_on_the_models_device(meta_device):
    model, info = load_bundled("resnet20_fmnist")
    stages = spatial_stages(model.to(meta_device), info.input_shape)
    assert [name for name, _ in stages][-3:] == ["layer1", "layer2", "layer3"]
    assert stages[0][1] == (info.input_shape[1], info.input_shape[2])


@pytest.mark.parametrize(
    "method,teacher",
    [
        ("gdfq", "resnet20_fmnist"),
        ("dsg", "resnet20_fmnist"),
        ("fdda", "resnet20_fmnist"),
        ("acq", "resnet20_fmnist"),
        ("lrq", "resnet20_fmnist"),
        ("dsg+acq+lrq", "mobilenetv2_fmnist"),
        ("fdda+acq", "resnet18_fmnist"),
    ],
)
def test_training_evaluation_and_resume_stay_on_the_device(meta_device, method, teacher, tmp_path):
    """Warm-up, calibration, fine-tuning, sample grids, evaluation and a checkpoint round trip."""
    model, info = load_bundled(teacher)
    eval_set = LabelledSet(torch.rand(8, *info.input_shape), torch.arange(8) % info.num_classes, "rand")
    spec = _spec(method)
    pipe = Pipeline(spec, model, info.num_classes, info.input_shape, meta_device, eval_set, info.preprocess)
    events = []
    history = pipe.run(events.append, checkpoint_path=tmp_path / "state.pt")
    assert pipe.step == spec.budget.total_iters
    assert {e.kind for e in events} >= {"phase", "step", "samples", "eval", "checkpoint"}
    assert len(history["evals"]) == spec.budget.epochs
    assert all(p.device == meta_device for p in pipe.student.parameters())
    again = Pipeline(spec, model, info.num_classes, info.input_shape, meta_device, eval_set, info.preprocess)
    again.load(tmp_path / "state.pt")
    assert again.step == pipe.step
    assert all(p.device == meta_device for p in again.generator.parameters())


@pytest.mark.parametrize("method", ["gdfq", "fdda-fewshot"])
def test_a_whole_job_runs_on_the_device(meta_device, method, tmp_path):
    """``run_job`` end to end: report, artifacts and export (which copies to the host itself)."""
    report = dfq.job.run_job(_spec(method, eval="fashion-mnist", eval_limit=16), "resnet20_fmnist", tmp_path)
    assert report["device"] == "meta"
    assert report["iterations"] == 6
    assert (tmp_path / "quantized.safetensors").exists()
