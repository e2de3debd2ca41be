"""A finished run's files, and loading a quantized model back from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from dfq.attention_view import write_attention
from dfq.images import save_grid
from dfq.models.checkpoint import CheckpointError, load_state_dict, save_state_dict
from dfq.models.registry import build_model
from dfq.models.teachers import TeacherInfo
from dfq.quant import quantize
from dfq.spec import JobSpec

if TYPE_CHECKING:
    from dfq.pipeline import Pipeline

QUANTIZED_FILE = "quantized.safetensors"
GENERATOR_FILE = "generator.safetensors"
SAMPLES_FILE = "samples.png"
ATTENTION_FILE = "attention.png"
FORMAT = "dfq-fakequant-v1"


def write_artifacts(
    pipe: Pipeline, info: TeacherInfo, spec: JobSpec, out: Path, report: dict[str, Any]
) -> None:
    meta = {"spec": json.dumps(spec.canonical()), "teacher": json.dumps(info.to_json()), "format": FORMAT}
    save_state_dict(
        {k: v.detach().cpu() for k, v in pipe.student.state_dict().items()}, out / QUANTIZED_FILE, meta
    )
    if "generator_skipped" not in pipe.history:
        # a generator whose steps were left out (budget.idle_generator) is its random initialisation:
        # its weights, sample grid and attention maps would show a model the student never met
        save_state_dict(
            {k: v.detach().cpu() for k, v in pipe.generator.state_dict().items()}, out / GENERATOR_FILE, meta
        )
        images, _ = pipe.sample_grid()
        per_class = len(images) // min(info.num_classes, 10)
        save_grid(images, out / SAMPLES_FILE, info.mean, info.std, per_class)
        write_attention(pipe, info, images, out / ATTENTION_FILE, per_class)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def load_quantized(path: str | Path) -> tuple[nn.Module, JobSpec, TeacherInfo]:
    """Rebuild the fake-quantized student from ``quantized.safetensors`` (architecture + spec from its
    metadata), so a downloaded artifact runs with nothing else at hand."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dfq quantized artifact (format {meta.get('format')!r})")
    spec = JobSpec.model_validate(json.loads(meta["spec"]))
    info_d: dict[str, Any] = json.loads(meta["teacher"])
    info = TeacherInfo(
        **{
            **info_d,
            "input_shape": tuple(info_d["input_shape"]),
            "mean": tuple(info_d["mean"]),
            "std": tuple(info_d["std"]),
        }
    )
    model = build_model(info.arch, info.num_classes, info.input_shape[0])
    student = quantize(model, spec.quant)
    student.load_state_dict(load_state_dict(path), strict=True)
    return student.eval(), spec, info
