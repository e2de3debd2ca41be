"""Deployable output of a finished job: the single entry point :func:`export_all`.

Writes, next to the run's other artifacts:

- ``model.qdq.onnx``: QuantizeLinear/DequantizeLinear ONNX (opset 13), checked with ``onnx.checker``
  and by onnxruntime against the PyTorch fake-quant model (:mod:`dfq.quant.parity`); a
  disagreement beyond the tolerance raises :class:`ParityError` (``strict=True``), or, as jobs
  run it, renames the file ``model.qdq.rejected.onnx`` and records why in ``export.onnx.rejected``;
- ``quantized.packed.safetensors``: k-bit packed weights + scales/zero points + everything else,
  reloaded after writing to prove the bit-exact round trip (:mod:`dfq.quant.packed`);
- ``model.pt2``: ``torch.export`` program of the frozen fake-quant model (bit-exact with it;
  ``torch.export.load(path).module()(x)``);
- ``report.md``: the model card (:mod:`dfq.model_card`), and the ``export`` section of
  ``report.json`` (returned, and stored into ``report`` when one is given).
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from dfq.model_card import render_model_card
from dfq.models.teachers import TeacherInfo
from dfq.quant.deploy import build_deploy_module
from dfq.quant.latency import kernel_counts, measure_latency
from dfq.quant.modules import ActQuant, QuantLayer
from dfq.quant.onnx_export import OPSET, export_onnx, op_counts
from dfq.quant.packed import PACKED_FILE, load_packed_into, save_packed
from dfq.quant.parity import ParityError, ParityTolerance, check_parity
from dfq.spec import JobSpec

ONNX_FILE = "model.qdq.onnx"
REJECTED_ONNX_FILE = "model.qdq.rejected.onnx"
TORCH_EXPORT_FILE = "model.pt2"
REPORT_MD = "report.md"
LATENCY_BATCHES = (1, 32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _float_bytes(module: nn.Module) -> int:
    return sum(v.numel() * 4 for v in module.state_dict().values() if v.is_floating_point())


def export_torch(student: nn.Module, example: torch.Tensor, path: str | Path) -> bool:
    """``torch.export`` the frozen fake-quant model (dynamic batch); True if it reproduces the
    student's outputs on ``example`` bit-exactly after saving and loading."""
    deploy, _ = build_deploy_module(student, fold_bn=False)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(deploy, (example[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    with torch.no_grad():
        return torch.equal(torch.export.load(str(path)).module()(example), student(example))


def _kernel_notes(
    bits: set[int], modes: dict[str, str], weights: dict[str, str], kernels: dict[str, Any]
) -> list[str]:
    """Plain statements about which bit-widths get fast integer kernels in onnxruntime."""
    notes = []
    if any(b > 8 for b in bits) or "float" in modes.values() or "float-fallback" in weights.values():
        notes.append(
            "quantizers wider than 8 bits (or with a range too far from 0 for int8) have no int8 form: they "
            "are written as float ops and no runtime has an integer kernel for them"
        )
    if "qdq-clip" in modes.values():
        notes.append(
            "activation grids narrower than 8 bits are enforced by an int8 Clip between QuantizeLinear and "
            "DequantizeLinear; onnxruntime does not fuse across it, so those layers run float kernels"
        )
    if kernels["integer_kernels"] == 0:
        notes.append(
            "no fast kernel at this bit-width: onnxruntime runs float convolutions plus the Q/DQ ops, so the "
            "QDQ model is not expected to be faster than FP32 on the CPU"
        )
    else:
        n_float = sum(kernels["float_ops"].values())
        notes.append(
            f"onnxruntime fused {kernels['integer_kernels']} node(s) into integer kernels "
            f"({', '.join(f'{k} x{v}' for k, v in kernels['integer_ops'].items())}); {n_float} float "
            "compute node(s) remain (BN kept separate, and conv outputs that feed a residual Add are not "
            "quantized in the GDFQ scheme)"
        )
    return notes


def export_all(
    student: nn.Module,
    spec: JobSpec,
    teacher_info: TeacherInfo,
    out_dir: str | Path,
    sample_inputs: torch.Tensor,
    report: dict[str, Any] | None = None,
    *,
    tolerance: ParityTolerance | None = None,
    latency: bool = True,
    threads: int | None = None,
    latency_budget_s: float = 3.0,
    strict: bool = True,
) -> dict[str, Any]:
    """Write every deployable artifact of ``student`` to ``out_dir``; return the ``export`` section.

    ``sample_inputs``: a batch of model inputs (preprocessed, e.g. generator samples) used for the
    parity check and the bit-exactness checks; 32-128 images are plenty. ``report``: the job's
    report dict; it gains ``report["export"]`` and is rendered to ``report.md`` (and rewritten to
    ``report.json``). Raises :class:`dfq.quant.parity.ParityError` if onnxruntime disagrees with the
    fake-quant model beyond ``tolerance``. ``threads``: onnxruntime threads for the latency figures
    (default: torch's thread count); ``latency_budget_s``: timing budget per model and batch size.
    ``strict=False`` (what jobs use): a parity failure is recorded instead of raised; the file is
    kept as ``model.qdq.rejected.onnx`` and every other artifact is still written.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(student).cpu().eval()
    x = sample_inputs.detach().float().cpu()
    shape = tuple(teacher_info.input_shape)
    threads = threads or torch.get_num_threads()
    meta = {"spec": json.dumps(spec.canonical()), "teacher": json.dumps(teacher_info.to_json())}

    deploy, info = build_deploy_module(model)
    proto = export_onnx(deploy, shape, out / ONNX_FILE)
    onnx_file, rejected = ONNX_FILE, None
    try:
        parity = check_parity(model, out / ONNX_FILE, x, tolerance)
    except ParityError as exc:  # keep the file for inspection, but never under the deployable name
        (out / ONNX_FILE).replace(out / REJECTED_ONNX_FILE)
        if strict:
            raise
        # A finished quantization is worth more than one of its file formats: record the
        # rejection (the model card shows it) and still write the packed and torch.export files.
        onnx_file, rejected, parity = REJECTED_ONNX_FILE, str(exc), exc.figures

    packed = save_packed(model, out / PACKED_FILE, meta)
    reloaded = load_packed_into(copy.deepcopy(model), out / PACKED_FILE)
    with torch.no_grad():
        packed["roundtrip_bit_exact"] = torch.equal(reloaded(x), model(x))

    torch_exact = export_torch(model, x, out / TORCH_EXPORT_FILE)

    fp32_bytes = _float_bytes(build_deploy_module(model, quantized=False)[0])
    bits = {m.w_bits for m in model.modules() if isinstance(m, QuantLayer)}
    bits |= {m.bits for m in model.modules() if isinstance(m, ActQuant)}
    kernels = kernel_counts(out / onnx_file, threads)
    section: dict[str, Any] = {
        "onnx": {
            "file": onnx_file,
            "rejected": rejected,
            "opset": OPSET,
            "bytes": (out / onnx_file).stat().st_size,
            "ops": op_counts(proto),
            "weights": info.weight_layers,
            "activations": info.activations,
            "checker": "passed",
        },
        "parity": parity,
        "packed": {"file": PACKED_FILE, **packed},
        "torch_export": {"file": TORCH_EXPORT_FILE, "bit_exact": torch_exact, "torch": torch.__version__},
        "size": {
            "fp32_bytes": fp32_bytes,
            "packed_bytes": packed["bytes"],
            "ratio": round(fp32_bytes / packed["bytes"], 2),
            "weights_fp32_bytes": packed["weight_bytes_fp32"],
            "weights_packed_bytes": packed["weight_bytes_packed"],
        },
        "kernels": kernels,
        "kernel_notes": _kernel_notes(bits - {32}, info.activations, info.weight_layers, kernels),
        "onnxruntime": ort.__version__,
    }
    if latency:
        with tempfile.TemporaryDirectory() as tmp:
            fp32_path = Path(tmp) / "model.fp32.onnx"
            export_onnx(build_deploy_module(model, quantized=False)[0], shape, fp32_path)
            section["size"]["fp32_onnx_bytes"] = fp32_path.stat().st_size
            section["latency"] = {
                "device": "cpu (onnxruntime CPUExecutionProvider)",
                "threads": threads,
                "fp32": [
                    measure_latency(fp32_path, shape, b, threads, budget_s=latency_budget_s)
                    for b in LATENCY_BATCHES
                ],
                "qdq": [
                    measure_latency(out / onnx_file, shape, b, threads, budget_s=latency_budget_s)
                    for b in LATENCY_BATCHES
                ],
            }
    section["files"] = {
        name: {"bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
        for name in (onnx_file, PACKED_FILE, TORCH_EXPORT_FILE)
    }
    section["export_s"] = round(time.perf_counter() - t_start, 2)
    if report is not None:
        report["export"] = section
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / REPORT_MD).write_text(
        render_model_card(report if report is not None else {"export": section}, teacher_info, spec)
    )
    return section
