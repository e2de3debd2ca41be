"""One quantization job from start to artifacts: the single code path behind the CLI and the worker.

``out_dir`` holds everything a run produces, and its resumable state, so re-running with the same
``out_dir`` after a crash continues from the last checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dfq
from dfq.artifacts import write_artifacts
from dfq.attention_view import write_attention
from dfq.data import LabelledSet, load_eval_set
from dfq.evaluate import agreement_on, evaluate_pair, layer_errors
from dfq.images import save_grid
from dfq.models.teachers import TeacherInfo, resolve_teacher
from dfq.pipeline import DivergedError, Event, Pipeline, resolve_device
from dfq.quant import activation_ranges
from dfq.quant.export import export_all
from dfq.spec import JobSpec, same_spec
from dfq.validate import validate_for_teacher

STATE_FILE = "state.pt"
REPORT_FILE = "report.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_PER_CLASS = 4


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the checkpoint we resume from: those steps will be run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def load_completed(out_dir: Path, spec: JobSpec) -> dict[str, Any] | None:
    """The report of a finished run of this exact spec in ``out_dir``, if there is one."""
    path = out_dir / REPORT_FILE
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return report if same_spec(report.get("spec"), spec) else None


def build_pipeline(
    spec: JobSpec, model: nn.Module, info: TeacherInfo, eval_set: LabelledSet | None = None
) -> Pipeline:
    """A job's pipeline: the spec checked against the teacher, then every set it names loaded (the eval set
    unless given, FDDA's few-shot calibration set, ``quant.round_data``'s images). One place, so a tool that
    redoes part of a job (bench/round_probe.py) builds the very pipeline the job did."""
    device = resolve_device(spec.device)
    validate_for_teacher(spec, model, info.input_shape, info.num_classes)
    if eval_set is None and spec.eval:
        eval_set = load_eval_set(spec.eval, info.input_shape, spec.eval_limit)
    fdda = spec.method.fdda
    calib = load_eval_set(fdda.calib_set, info.input_shape) if fdda and fdda.centers == "few-shot" else None
    round_ref = spec.quant.round_set
    round_set = load_eval_set(round_ref, info.input_shape) if round_ref is not None else None
    return Pipeline(
        spec,
        model,
        info.num_classes,
        info.input_shape,
        device,
        eval_set,
        info.preprocess,
        SAMPLES_PER_CLASS,
        calib_set=calib,
        round_set=round_set,
    )


def run_job(
    spec: JobSpec,
    teacher: str | tuple[nn.Module, TeacherInfo],
    out_dir: str | Path,
    on_event: Callable[[Event], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    arch: str | None = None,
    eval_set: LabelledSet | None = None,
) -> dict[str, Any]:
    """Quantize ``teacher`` as ``spec`` says; write artifacts to ``out_dir``; return the report."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, info = resolve_teacher(teacher, arch) if isinstance(teacher, str) else teacher
    pipe = build_pipeline(spec, model, info, eval_set)
    device, eval_set = pipe.device, pipe.eval_set
    state_path = out / STATE_FILE
    resumed_from = None
    if state_path.exists():
        pipe.load(state_path)
        resumed_from = pipe.step
        _trim_metrics(out / METRICS_FILE, pipe.step)

    metrics_file = (out / METRICS_FILE).open("a")

    def handle(event: Event) -> None:
        if event.kind == "step":
            metrics_file.write(json.dumps({"step": event.step, "epoch": event.epoch, **event.metrics}) + "\n")
            metrics_file.flush()
        elif event.kind == "samples" and event.images is not None:
            save_grid(
                event.images,
                out / "samples" / f"step_{event.step:06d}.png",
                info.mean,
                info.std,
                SAMPLES_PER_CLASS,
            )
            step_png = out / "attention" / f"step_{event.step:06d}.png"
            write_attention(pipe, info, event.images, step_png, SAMPLES_PER_CLASS)
        if on_event is not None:
            on_event(event)

    try:
        history = pipe.run(handle, should_cancel, state_path)
    finally:
        metrics_file.close()

    _check_converged(pipe.student, pipe.step)
    report = finish_report(pipe, info, spec, eval_set, device)
    report.update(
        {
            "wall_s": round(time.perf_counter() - t_start, 2),
            "resumed_from_step": resumed_from,
            "peak_mem_mb": round(_peak_memory_mb(device), 1),
            "train_s": round(history["train_s"], 2),
            "it_per_s": round(pipe.steps_run / max(history["train_s"], 1e-9), 3),
        }
    )
    z, y = pipe.generator.sample_inputs(64, torch.Generator().manual_seed(spec.seed + 2))
    latency = spec.export.latency if spec.export.latency is not None else spec.budget.preset != "smoke"
    section = export_all(
        pipe.student, spec, info, out, pipe.synthesize(z, y), report, latency=latency, strict=False
    )
    if section["onnx"]["rejected"]:
        report.setdefault("warnings", []).append(f"ONNX export rejected: {section['onnx']['rejected']}")
    write_artifacts(pipe, info, spec, out, report)
    state_path.unlink(missing_ok=True)
    return report


def _check_converged(student: nn.Module, step: int) -> None:
    """Fail with the cause, not with an export error downstream (NaN weights cannot be packed)."""
    bad = [n for n, p in student.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DivergedError(
            f"the student diverged: {len(bad)} parameter tensor(s) are non-finite after step {step} "
            f"(first: {bad[0]}); metrics.jsonl shows where its loss blew up. Lower budget.lr_s "
            "(e.g. 1e-4) or set budget.clip_grad_s, and run again into another --out"
        )


def finish_report(
    pipe: Pipeline, info: TeacherInfo, spec: JobSpec, eval_set: LabelledSet | None, device: torch.device
) -> dict[str, Any]:
    q, m = spec.quant, spec.method
    report: dict[str, Any] = {
        "method": m.preset or "custom",
        "components": m.components,
        "real_data_used": spec.real_data_used,
        "bits": q.label,
        "layers": q.layers_label,
        "quant_preset": q.preset,
        "kd_reduction": m.kd_reduction,
        "act_range": q.act_range,
        "act_clip": q.act_clip,
        "act_ste": q.act_ste,
        "act_equalize": q.act_equalize,
        "act_mse_weight": q.act_mse_weight,
        "weight_round": q.weight_round,
        "budget": spec.budget.preset or "custom",
        "seed": spec.seed,
        "device": f"{device} ({torch.cuda.get_device_name(device)})"
        if device.type == "cuda"
        else str(device),
        "iterations": pipe.steps_run,
        "generator_skipped": pipe.history.get("generator_skipped"),  # budget.idle_generator
        "student_steps": max(0, pipe.step - spec.budget.warmup_iters),  # those run, not those planned
        "teacher": json.loads(json.dumps(info.to_json())),
        "spec": spec.canonical(),
        "dfq_version": dfq.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if eval_set is not None:
        report.update(
            {
                k: round(v, 2) if isinstance(v, float) else v
                for k, v in evaluate_pair(
                    pipe.teacher, pipe.student, eval_set, info.preprocess, device
                ).items()
            }
        )
        report["eval_set"] = eval_set.name
    else:
        z, y = pipe.generator.sample_inputs(512, torch.Generator().manual_seed(spec.seed + 1))
        x = pipe.synthesize(z, y)
        report.update(
            {
                "fp_top1": None,
                "q_top1": None,
                "agreement_synthetic": round(agreement_on(pipe.teacher, pipe.student, x), 2),
            }
        )
    best = pipe.history.get("best")
    if best:
        report["best_epoch"] = {
            **best,
            "note": "best of the per-epoch evaluations (test-set model selection, as the reference repos "
            "report); the headline q_top1 is the final epoch",
        }
    report["evals"] = pipe.history.get("evals", [])
    report["oom_batch_halvings"] = pipe.history.get("oom", [])  # see dfq/oom.py
    report["layer_errors"] = layer_errors(pipe.student)
    if "rounded" in pipe.history:  # quant.weight_round's per-layer figures (adaround's errors, squant's sums)
        report["weight_rounding"] = {
            layer: {k: round(v, 6) for k, v in figures.items()}
            for layer, figures in pipe.history["rounded"].items()
        }
    if "bias_corrected" in pipe.history:  # quant.bias_correct: each corrected module's mean |shift|
        report["bias_correction"] = {
            name: {"shift": round(f["shift"], 6), "onto": "bias" if f["kind"] else "bn_running_mean"}
            for name, f in pipe.history["bias_corrected"].items()
        }
    report["activation_ranges"] = {
        k: [round(a, 5), round(b, 5)] for k, (a, b) in activation_ranges(pipe.student).items()
    }
    return report
