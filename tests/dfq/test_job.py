"""A `smoke` job end to end on a bundled teacher, through the same code path as the CLI and worker."""

import json

import pytest
import torch

from dfq.artifacts import load_quantized
from dfq.data import fashion_mnist
from dfq.job import run_job
from dfq.models.teachers import load_bundled
from dfq.spec import JobSpec


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    spec = JobSpec.model_validate(
        {
            "method": "gdfq",
            "bits": "W4A4",
            "budget": "smoke",
            "seed": 0,
            "eval": "fashion-mnist",
            "eval_limit": 400,
            "device": "cpu",
        }
    )
    events = []
    report = run_job(spec, "resnet20_fmnist", out, on_event=events.append)
    return out, spec, report, events


def test_report_has_the_promised_fields(smoke_run):
    out, spec, report, _ = smoke_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    for key in (
        "fp_top1",
        "q_top1",
        "agreement",
        "method",
        "bits",
        "budget",
        "seed",
        "wall_s",
        "device",
        "spec",
    ):
        assert key in report, key
    assert report["spec"] == spec.canonical() and report["bits"] == "W4A4" and report["layers"] == "F4L4"
    assert report["n_eval"] == 400 and report["iterations"] == spec.budget.total_iters
    assert 80 < report["fp_top1"] <= 100 and 0 <= report["q_top1"] <= 100
    assert len(report["layer_errors"]) == 22 and all(r["rel_mse"] > 0 for r in report["layer_errors"])
    assert not (out / "state.pt").exists()  # finished runs drop their resumable state
    assert "weight_rounding" not in report  # nearest rounding: nothing to report


def test_a_rounding_job_reports_each_layer(tmp_path):
    spec = JobSpec.model_validate(
        {"bits": "W4A4", "budget": "smoke", "device": "cpu", "quant": {"weight_round": "squant"}}
    )
    report = run_job(spec, "resnet20_fmnist", tmp_path)
    rounding = report["weight_rounding"]
    assert len(rounding) == 22 and list(rounding)[-1] == "fc"  # resnet20: 21 convs + fc
    assert all(0 < f["changed"] < 0.5 and f["channel_sum"] <= 0.5 + 1e-5 for f in rounding.values())
    assert json.loads((tmp_path / "report.json").read_text())["weight_rounding"] == rounding
    moved = 100 * sum(f["changed"] for f in rounding.values()) / 22
    assert (
        f"Weight rounding (`squant`) ran on 22 layers and moved {moved:.1f}% of their weights"
        in (tmp_path / "report.md").read_text()
    )


def test_artifacts_exist_and_reload(smoke_run):
    out, spec, report, _ = smoke_run
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.size[0] > 200 and im.size[1] > 500  # 4 columns x 10 class rows, upscaled
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, spec.budget.total_iters + 1))

    student, spec2, info = load_quantized(out / "quantized.safetensors")
    assert spec2 == spec and info.name == "resnet20_fmnist"
    test = fashion_mnist("test").subset(400)
    with torch.no_grad():
        pred = student(info.preprocess(test.images)).argmax(1)
    assert round(100 * (pred == test.labels).float().mean().item(), 2) == report["q_top1"]


def test_deployable_artifacts_and_model_card(smoke_run):
    out, _, report, _ = smoke_run
    for name in ("model.qdq.onnx", "quantized.packed.safetensors", "model.pt2", "report.md"):
        assert (out / name).stat().st_size > 0, name
    ex = report["export"]
    assert ex["parity"]["passed"] and ex["packed"]["roundtrip_bit_exact"] and ex["torch_export"]["bit_exact"]
    card = (out / "report.md").read_text()
    assert f"{report['q_top1']:.2f}" in card and "W4A4" in card and "Parity: **passed**" in card


def test_attention_figures_of_teacher_and_student(smoke_run):
    out, _spec, _report, _ = smoke_run
    from PIL import Image

    with Image.open(out / "attention.png") as im:
        assert im.size[0] > 300 and im.size[1] > 500  # 2 samples x (image, teacher, student), 10 rows
    summary = json.loads((out / "attention.json").read_text())
    assert summary["stage"] == "layer3" and len(summary["tv"]) == 20
    steps = sorted(p.name for p in (out / "attention").iterdir())
    assert steps == ["step_000003.json", "step_000003.png", "step_000006.json", "step_000006.png"]


def test_without_labelled_set_reports_synthetic_agreement(tmp_path):
    model, info = load_bundled("resnet20_fmnist")
    spec = JobSpec.model_validate(
        {"bits": "W8A8", "budget": {"preset": "smoke", "epochs": 2, "iters_per_epoch": 2}, "device": "cpu"}
    )
    report = run_job(spec, (model, info), tmp_path)
    assert report["q_top1"] is None and 0 <= report["agreement_synthetic"] <= 100


def test_a_diverged_student_fails_with_its_cause():
    from torch import nn

    from dfq.job import DivergedError, _check_converged

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    _check_converged(model, 5)  # finite: nothing to say
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DivergedError, match=r"non-finite after step 5 \(first: 0.weight\).*lr_s"):
        _check_converged(model, 5)


def test_a_calibration_only_job_keeps_the_teachers_weights_and_calibrates_its_ranges(tmp_path):
    from dfq.model_card import render_model_card
    from dfq.quant import ActQuant, quantize

    model, info = load_bundled("resnet20_fmnist")
    spec = JobSpec.model_validate(
        {
            "bits": "W4A4",
            "budget": {
                "preset": "calibrate",
                "epochs": 2,
                "warmup_epochs": 2,
                "iters_per_epoch": 2,
                "batch_size": 8,
                "eval_every": 0,
            },
            "eval": "fashion-mnist",
            "eval_limit": 200,
            "device": "cpu",
        }
    )
    report = run_job(spec, (model, info), tmp_path)
    assert report["iterations"] == 4 and report["student_steps"] == 0 and report["q_top1"] is not None
    student, _, _ = load_quantized(tmp_path / "quantized.safetensors")
    fresh = quantize(model, spec.quant)
    trained = dict(student.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())  # never stepped
    quantizers = [m for m in student.modules() if isinstance(m, ActQuant)]
    assert quantizers and all(int(m.updates) == 4 for m in quantizers)  # every batch calibrated them
    card = render_model_card(report, info, spec)
    assert "calibration only, no student step" in card


def test_a_job_on_the_recon_preset_reconstructs_block_wise_and_says_so(tmp_path):
    """The preset as a job runs it: on a calibration-only budget, every residual block learns its rounding
    and its activation steps, and the report, the model card and the headline name the preset."""
    spec = JobSpec.model_validate(
        {
            "bits": "W4A4",
            "budget": {"preset": "smoke", "epochs": 1, "warmup_epochs": 1},
            "quant": {"preset": "recon", "round_iters": 4, "round_images": 32},
            "device": "cpu",
        }
    )
    report = run_job(spec, "resnet20_fmnist", tmp_path)
    assert report["quant_preset"] == "recon" and report["student_steps"] == 0
    assert report["act_clip"] == "bn-mse" and report["act_mse_weight"] == "consumer"
    rounding = report["weight_rounding"]
    blocks = [name for name in rounding if name.startswith("layer")]
    assert len(blocks) == 9 and all("act_step_change" in rounding[b] for b in blocks)
    assert "| quantization preset | recon |" in (tmp_path / "report.md").read_text()
