"""``report.md``: a job's model card, rendered from its ``report.json``.

A deployment reviewer reads this, not the JSON: what was quantized, with which method and every
switch that changes results (F8L8, KD reduction, EMA mode, real data or not), how accurate it is,
what the files are, how far the ONNX export is from the PyTorch model, and what it costs in bytes
and milliseconds. Fields missing from the report (a run without a labelled set, an export without
latency) are shown as such, never invented.
"""

from __future__ import annotations

from typing import Any

from dfq.models.teachers import TeacherInfo
from dfq.spec import JobSpec


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _switches(spec: JobSpec) -> list[list[Any]]:
    q, m, b = spec.quant, spec.method, spec.budget
    rows: list[list[Any]] = [
        ["method preset", m.preset or "custom"],
        ["components", ", ".join(m.components)],
        ["bits", q.label],
        ["quantization preset", q.preset or "none"],
        ["first/last layer", q.layers_label],
        ["per-channel weights", q.per_channel],
        [
            "activation range EMA",
            f"{q.act_range} (beta {q.ema_beta}, {q.calibration_epochs} calibration epochs); "
            f"rule {q.act_clip} ({q.act_mse_weight} channel weights), STE {q.act_ste}, "
            f"equalised {q.act_equalize}",
        ],
        [
            "weight rounding",
            q.weight_round
            + (
                f" ({q.round_iters} steps per {q.round_unit} on {q.round_images} images from {q.round_data}"
                + (f", QDrop input drop {q.round_drop:g}" if q.round_drop else "")
                + (f", activation steps learnt (LSQ, lr {q.round_act_lr:g})" if q.round_act == "lsq" else "")
                + ")"
                if q.weight_round == "adaround"
                else ""
            ),
        ],
        ["generator", m.generator],
        ["KD", f"alpha {m.kd_alpha}, T {m.kd_temperature}, reduction {m.kd_reduction}"],
        ["loss weights", f"G CE {m.g_ce_weight}, BNS {m.bns_weight}, S CE {m.s_ce_weight}"],
        ["real data used", spec.real_data_used],
        [
            "budget",
            f"{b.preset or 'custom'}: {b.epochs} epochs x {b.iters_per_epoch} iters, batch {b.batch_size}, "
            f"{b.warmup_epochs} warm-up epochs; "
            + (
                f"{b.student_steps} student steps" if b.student_steps else "calibration only, no student step"
            ),
        ],
        ["seed", spec.seed],
    ]
    return rows


def render_model_card(report: dict[str, Any], info: TeacherInfo, spec: JobSpec) -> str:
    """Markdown model card for a job's report (with or without its ``export`` section)."""
    lines = [f"# Model card: {info.name} quantized to {spec.quant.label} ({spec.quant.layers_label})", ""]
    lines += ["## Teacher", ""]
    lines += _table(
        ["field", "value"],
        [
            ["architecture", info.arch],
            [
                "input",
                "x".join(map(str, info.input_shape)) + f", mean {list(info.mean)}, std {list(info.std)}",
            ],
            ["classes", info.num_classes],
            ["dataset", info.dataset],
            ["sha256", info.sha256],
        ],
    )
    lines += ["## Method and switches", ""]
    lines += _table(["switch", "value"], _switches(spec))
    rounding = report.get("weight_rounding")
    if rounding:
        moved = sum(f.get("changed", 0.0) for f in rounding.values()) / len(rounding)
        lines += [
            f"Weight rounding (`{spec.quant.weight_round}`) ran on {len(rounding)} layers and moved "
            f"{100 * moved:.1f}% of their weights (layer mean) off nearest rounding; per layer in "
            "report.json's `weight_rounding`.",
            "",
        ]
    shifts = report.get("bias_correction")
    if shifts:
        lines += [
            f"Bias correction (`quant.bias_correct`) took the mean output shift of {len(shifts)} quantized "
            f"layers off, measured against the teacher on {spec.quant.bias_images} images from "
            f"{spec.quant.round_data} (mean |shift| {sum(f['shift'] for f in shifts.values()) / len(shifts):.4g}); "
            "per layer in report.json's `bias_correction`.",
            "",
        ]
    skipped = report.get("generator_skipped")
    if skipped:
        lines += [
            f"The generator's {skipped['steps']} steps were left out (`budget.idle_generator: skip`): "
            f"{skipped['reason']}, so they could not change the student. The job has no generator curves, and no "
            "generator weights, sample grid or attention maps: the untrained generator's would show images "
            "the student never met.",
            "",
        ]
    lines += ["## Accuracy", ""]
    if report.get("q_top1") is not None:
        lines += _table(
            ["FP top-1 (%)", "quantized top-1 (%)", "top-1 agreement (%)", "labelled set", "images"],
            [
                [
                    report.get("fp_top1"),
                    report.get("q_top1"),
                    report.get("agreement"),
                    report.get("eval_set"),
                    report.get("n_eval"),
                ]
            ],
        )
    elif report.get("agreement_synthetic") is not None:
        lines += [
            f"No labelled set was given: top-1 agreement with the teacher on synthetic images is "
            f"{_fmt(report['agreement_synthetic'])}%.",
            "",
        ]
    else:
        lines += ["No accuracy figures in this report.", ""]
    ex = report.get("export")
    if not ex:
        return "\n".join(lines)
    p = ex["parity"]
    lines += ["## ONNX export (QDQ) vs the PyTorch fake-quant model", ""]
    lines += [
        f"`{ex['onnx']['file']}`: opset {ex['onnx']['opset']}, `onnx.checker` {ex['onnx']['checker']}; run in "
        f"{p['runtime']} on {p['n']} inputs. Parity: **{'passed' if p['passed'] else 'FAILED'}**.",
        "",
    ]
    tol = p["tolerance"]
    seg = p.get("segments", {})
    rows = [
        [
            "segment: codes that differ (worst quantizer)",
            f"{seg.get('code_mismatch_max', float('nan')):.3g}",
            f"<= {tol['max_code_mismatch']}",
        ],
        ["segment: largest code difference (steps)", seg.get("code_step_max"), f"<= {tol['max_code_step']}"],
        [
            "segment: logits max-abs / max abs logit",
            f"{seg.get('forced_logit_max_abs_rel', float('nan')):.3g}",
            f"<= {tol['max_forced_logit_rel']}",
        ],
        ["end to end: max-abs logit difference", f"{p['max_abs']:.3g}", ""],
        ["end to end: ... relative to max abs logit", f"{p['max_abs_rel']:.3g}", f"<= {tol['max_abs_rel']}"],
        ["end to end: mean per-sample cosine", f"{p['cosine_mean']:.6f}", f">= {tol['min_cosine_mean']}"],
        ["end to end: worst per-sample cosine", f"{p['cosine_min']:.6f}", ""],
        ["end to end: top-1 agreement", f"{p['top1_agreement']:.4f}", f">= {tol['min_top1']}"],
    ]
    lines += _table(["figure", "value", "tolerance"], rows)
    lines += [
        "Segment figures: each activation quantizer's codes recomputed by onnxruntime from the PyTorch "
        "model's codes of the previous quantizer (no error accumulation); end-to-end figures: the file run "
        "as deployed, where rounding-boundary differences compound through the layers.",
        "",
    ]
    lines += ["## Size", ""]
    s = ex["size"]
    lines += _table(
        ["model", "bytes", "size"],
        [
            ["FP32 (all float tensors)", s["fp32_bytes"], _mib(s["fp32_bytes"])],
            [f"packed ({ex['packed']['file']})", s["packed_bytes"], _mib(s["packed_bytes"])],
            ["weights only, FP32", s["weights_fp32_bytes"], _mib(s["weights_fp32_bytes"])],
            ["weights only, packed", s["weights_packed_bytes"], _mib(s["weights_packed_bytes"])],
        ],
    )
    lines += [
        f"Compression FP32 / packed: {s['ratio']}x. Packed round trip bit-exact: {_fmt(ex['packed']['roundtrip_bit_exact'])}.",
        "",
    ]
    lat = ex.get("latency")
    lines += ["## CPU latency (onnxruntime)", ""]
    if lat:
        rows = [
            [f["batch"], f["median_ms"], q["median_ms"], round(f["median_ms"] / q["median_ms"], 2), q["runs"]]
            for f, q in zip(lat["fp32"], lat["qdq"], strict=True)
        ]
        lines += [f"{lat['device']}, {lat['threads']} thread(s); median of timed runs after warm-up.", ""]
        lines += _table(["batch", "FP32 ms", "QDQ ms", "speed-up", "runs"], rows)
    else:
        lines += ["Not measured for this run.", ""]
    lines += [f"- {n}" for n in ex.get("kernel_notes", [])] + [""]
    lines += ["## Files", ""]
    lines += _table(
        ["file", "bytes", "sha256"],
        [[name, f["bytes"], f"`{f['sha256']}`"] for name, f in ex.get("files", {}).items()],
    )
    lines += [
        f"`{ex['torch_export']['file']}`: `torch.export` program of the frozen fake-quant model "
        f"(torch {ex['torch_export']['torch']}), bit-exact with it: {_fmt(ex['torch_export']['bit_exact'])}. "
        "Load with `torch.export.load(path).module()`.",
        "",
    ]
    return "\n".join(lines)
