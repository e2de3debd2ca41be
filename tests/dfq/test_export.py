"""ONNX QDQ export checked by onnxruntime, tamper detection, torch.export, and export_all end to end."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from dfq.models.registry import build_model
from dfq.models.teachers import TeacherInfo, load_bundled, read_manifest
from dfq.quant import quantize, set_calibration
from dfq.quant.deploy import build_deploy_module
from dfq.quant.export import ONNX_FILE, REJECTED_ONNX_FILE, export_all, export_torch
from dfq.quant.onnx_export import export_onnx, op_counts
from dfq.quant.packed import PACKED_FILE, load_packed
from dfq.quant.parity import ParityError, ParityTolerance, check_parity
from dfq.spec import JobSpec


def _teacher(arch: str, in_ch: int, size: int):
    """The bundled teacher of that architecture if there is one, else random weights with
    non-trivial BN statistics (parity does not depend on the weights being trained)."""
    for name, entry in read_manifest().items():
        if entry["arch"] == arch and entry["input_shape"][0] == in_ch:
            model, info = load_bundled(name)
            return model, info
    torch.manual_seed(0)
    model = build_model(arch, 10, in_ch).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, in_ch, size, size))
    info = TeacherInfo(arch, arch, 10, (in_ch, size, size), (0.0,) * in_ch, (1.0,) * in_ch)
    return model.eval(), info


def _student(model, info, bits: str):
    spec = JobSpec.model_validate({"bits": bits, "device": "cpu"})
    student = quantize(model, spec.quant)
    set_calibration(student, True)
    g = torch.Generator().manual_seed(0)  # the ranges must not hang on what earlier tests drew
    with torch.no_grad():
        for _ in range(2):
            student(torch.randn(8, *info.input_shape, generator=g))
    set_calibration(student, False)
    return student.eval(), spec


CASES = [
    ("resnet20", 1, 28, "W2A2"),
    ("resnet20", 1, 28, "W4A4"),
    ("resnet20", 1, 28, "W8A8"),
    ("resnet20", 1, 28, "W4A4-F8L8"),
    ("resnet20", 1, 28, "W10A10"),  # beyond int8: float fallback
    ("resnet18", 3, 64, "W4A4"),
    ("resnet18", 3, 64, "W8A8"),
    ("mobilenet_v2", 3, 64, "W4A4"),
    ("mobilenet_v2", 3, 64, "W8A8"),
]


@pytest.mark.parametrize(("arch", "in_ch", "size", "bits"), CASES)
def test_onnx_export_matches_fake_quant_in_onnxruntime(tmp_path, arch, in_ch, size, bits):
    model, info = _teacher(arch, in_ch, size)
    student, spec = _student(model, info, bits)
    deploy, dinfo = build_deploy_module(student)
    proto = export_onnx(deploy, info.input_shape, tmp_path / "m.onnx")  # onnx.checker runs inside
    ops = op_counts(proto)
    n_layers = len(dinfo.weight_layers)
    n_acts = len(dinfo.activations)
    if spec.quant.w_bits <= 8:
        assert ops["QuantizeLinear"] == n_acts  # one Q/DQ pair per activation quantizer
        assert ops["DequantizeLinear"] >= n_acts + n_layers - list(dinfo.weight_layers.values()).count(
            "float-fallback"
        )
        int8_weights = [
            i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1
        ]
        assert int8_weights  # the weights travel as int8 codes, not floats
    else:
        assert "QuantizeLinear" not in ops and ops["Round"] == n_acts
    # Random-noise inputs and ranges calibrated on noise put logits near ties, so one boundary flip
    # can change the arg-max: top-1 agreement is gated for jobs (generator samples through a trained
    # student) only; the segment checks below are the strict part.
    loose_top1 = ParityTolerance(min_top1=0.0)
    figures = check_parity(student, tmp_path / "m.onnx", torch.randn(8, *info.input_shape), loose_top1)
    assert figures["passed"], figures
    seg = figures["segments"]
    assert seg["quantizers_checked"] == (n_acts if spec.quant.a_bits <= 8 else 0)
    assert seg["code_step_max"] <= 1 and seg["code_mismatch_max"] < 1e-3  # only boundary flips
    if spec.quant.a_bits <= 8:
        assert seg["forced_logit_max_abs_rel"] < 1e-5


def test_per_channel_weight_dequantize_uses_axis_zero(tmp_path):
    model, info = _teacher("resnet20", 1, 28)
    student, _ = _student(model, info, "W4A4")
    proto = export_onnx(build_deploy_module(student)[0], info.input_shape)
    inits = {i.name: i for i in proto.graph.initializer}
    weight_dq = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".codes")
    ]
    assert len(weight_dq) == 22
    for n in weight_dq:
        assert [a.i for a in n.attribute if a.name == "axis"] == [0]
        assert inits[n.input[1]].dims[0] == inits[n.input[0]].dims[0]  # one scale per output channel
        codes = numpy_helper.to_array(inits[n.input[0]]).reshape(inits[n.input[0]].dims[0], -1)
        assert (codes.max(1).astype(int) - codes.min(1) <= 15).all()  # 16 levels per channel: 4-bit codes
        assert not numpy_helper.to_array(inits[n.input[2]]).any()  # stored as q + zp with zero point 0


def _tamper(src, dst, name_suffix, fn):
    proto = onnx.load(str(src))
    hits = [i for i in proto.graph.initializer if i.name.endswith(name_suffix)]
    target = hits[len(hits) // 2]  # a layer in the middle of the network
    target.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(target)), target.name))
    onnx.save(proto, str(dst))
    return target.name


@pytest.mark.parametrize(
    ("bits", "suffix", "fn"),
    [
        ("W2A2", ".codes", lambda a: np.flip(a, axis=0).copy()),  # output channels' weights swapped around
        ("W2A2", ".codes", lambda a: np.clip(a.astype(np.int16) + 1, -128, 127).astype(a.dtype)),  # codes + 1
        ("W2A2", "onnx_scale", lambda a: (a * 1.1).astype(a.dtype)),  # a weight or activation scale, +10%
        ("W8A8", ".codes", lambda a: np.clip(a.astype(np.int16) + 1, -128, 127).astype(a.dtype)),
    ],
)
def test_tampered_export_is_caught_by_the_parity_check(tmp_path, bits, suffix, fn):
    model, info = _teacher("resnet20", 1, 28)
    student, _ = _student(model, info, bits)
    export_onnx(build_deploy_module(student)[0], info.input_shape, tmp_path / "ok.onnx")
    x = torch.randn(8, *info.input_shape)
    assert check_parity(student, tmp_path / "ok.onnx", x)["passed"]
    name = _tamper(tmp_path / "ok.onnx", tmp_path / "bad.onnx", suffix, fn)
    with pytest.raises(ParityError, match="disagrees with the PyTorch fake-quant model") as err:
        check_parity(student, tmp_path / "bad.onnx", x)
    assert not err.value.figures["passed"], name


def test_bn_folding_is_exact_in_pytorch_and_opt_in():
    model, info = _teacher("resnet20", 1, 28)
    student, _ = _student(model, info, "W4A4")
    folded, finfo = build_deploy_module(student, fold_bn=True)
    plain, pinfo = build_deploy_module(student)
    assert finfo.bn_folded == finfo.bn_total == 21 and pinfo.bn_folded == 0
    # Folding is exact in integer arithmetic, not in float: w*gamma/sigma rounds differently from
    # conv-then-BN in the last bits, and an activation that sits on a 4-bit rounding boundary then lands
    # one code away (measured: 1 sample in 320 beyond 1e-3 relative, worst 1.2%, top-1 unchanged). So
    # the claim is "nearly all samples to 1e-3, none far off", on a fixed input.
    x = torch.randn(64, *info.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = student(x)
        assert torch.equal(plain(x), ref)  # the unfolded view is the fake-quant model, bit for bit
        out = folded(x)
        rel = (out - ref).abs().amax(1) / float(ref.abs().max())
        assert (rel <= 1e-3).float().mean() >= 0.95 and float(rel.max()) < 0.05
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_torch_export_is_bit_exact(tmp_path):
    model, info = _teacher("resnet20", 1, 28)
    student, _ = _student(model, info, "W3A3")
    x = torch.randn(5, *info.input_shape)
    assert export_torch(student, x, tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2"))
    x2 = torch.randn(3, *info.input_shape)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        assert torch.equal(program.module()(x2), student(x2))


def test_export_all_writes_every_artifact_and_the_model_card(tmp_path):
    model, info = _teacher("resnet20", 1, 28)
    student, spec = _student(model, info, "W4A4-F8L8")
    report = {"bits": spec.quant.label, "q_top1": None, "agreement_synthetic": 91.5}
    x = torch.randn(16, *info.input_shape)
    section = export_all(student, spec, info, tmp_path, x, report, threads=1, latency_budget_s=0.1)
    for name in (ONNX_FILE, PACKED_FILE, "model.pt2", "report.md", "report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert report["export"] is section
    assert json.loads((tmp_path / "report.json").read_text())["export"]["parity"]["passed"]
    assert section["packed"]["roundtrip_bit_exact"] and section["torch_export"]["bit_exact"]
    assert section["size"]["packed_bytes"] < section["size"]["fp32_bytes"] / 3
    assert [r["batch"] for r in section["latency"]["qdq"]] == [1, 32]
    assert section["kernel_notes"]
    card = (tmp_path / "report.md").read_text()
    for needle in (
        "W4A4-F8L8",
        "F8L8",
        "Parity: **passed**",
        "reduction mean",
        "91.50%",
        "## CPU latency",
        "model.pt2",
    ):
        assert needle in card, needle
    # the packed file alone rebuilds the model (architecture and spec from its metadata)
    loaded, spec2, info2 = load_packed(tmp_path / PACKED_FILE)
    x = torch.randn(4, *info.input_shape)
    with torch.no_grad():
        assert spec2 == spec and info2.arch == info.arch and torch.equal(loaded(x), student(x))


def test_export_all_fails_loudly_and_withholds_a_disagreeing_onnx(tmp_path, monkeypatch):
    model, info = _teacher("resnet20", 1, 28)
    student, spec = _student(model, info, "W4A4")
    import dfq.quant.export as export_mod

    real = export_mod.export_onnx

    def broken_export(deploy, shape, path=None):  # a bug that corrupts one layer's scales
        proto = real(deploy, shape, path)
        _tamper(path, path, "onnx_scale", lambda a: (a * 2).astype(a.dtype))
        return proto

    monkeypatch.setattr(export_mod, "export_onnx", broken_export)
    with pytest.raises(ParityError):
        export_all(student, spec, info, tmp_path, torch.randn(16, *info.input_shape), latency=False)
    assert not (tmp_path / ONNX_FILE).exists() and (tmp_path / REJECTED_ONNX_FILE).exists()


def test_jobs_keep_every_other_artifact_when_the_onnx_file_is_rejected(tmp_path, monkeypatch):
    """strict=False (as run_job calls it): the rejection is recorded, the rest is still written."""
    model, info = _teacher("resnet20", 1, 28)
    student, spec = _student(model, info, "W4A4")
    import dfq.quant.export as export_mod

    real = export_mod.export_onnx

    def broken_export(deploy, shape, path=None):
        proto = real(deploy, shape, path)
        _tamper(path, path, "onnx_scale", lambda a: (a * 2).astype(a.dtype))
        return proto

    monkeypatch.setattr(export_mod, "export_onnx", broken_export)
    report: dict = {}
    section = export_all(
        student, spec, info, tmp_path, torch.randn(16, *info.input_shape), report, latency=False, strict=False
    )
    assert "disagrees with the PyTorch fake-quant model" in section["onnx"]["rejected"]
    assert section["onnx"]["file"] == REJECTED_ONNX_FILE and section["parity"]["passed"] is False
    assert not (tmp_path / ONNX_FILE).exists() and (tmp_path / REJECTED_ONNX_FILE).exists()
    assert set(section["files"]) == {REJECTED_ONNX_FILE, "quantized.packed.safetensors", "model.pt2"}
    assert section["packed"]["roundtrip_bit_exact"] is True
    assert "FAILED" in (tmp_path / "report.md").read_text()
