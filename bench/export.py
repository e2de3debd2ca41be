"""Export benchmark: size FP32 vs packed, and onnxruntime CPU latency FP32 ONNX vs QDQ ONNX.

For each teacher and bit-width: quantize, calibrate activation ranges on random inputs (sizes and
latencies do not depend on how well the student was fine-tuned), export, and measure. Bundled
teachers are used where ``teachers/manifest.json`` has them; an architecture without a bundled
teacher runs with random weights at its bundled input size (said in the table). Writes
``bench/results/export.json`` and ``.md`` and prints the table.

    python bench/export.py --threads 1 --bits W2A2 W4A4 W8A8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from dfq.models.registry import build_model  # noqa: E402
from dfq.models.teachers import load_bundled, read_manifest  # noqa: E402
from dfq.quant import quantize, set_calibration  # noqa: E402
from dfq.quant.deploy import build_deploy_module  # noqa: E402
from dfq.quant.latency import kernel_counts, measure_latency  # noqa: E402
from dfq.quant.onnx_export import export_onnx  # noqa: E402
from dfq.quant.packed import save_packed  # noqa: E402
from dfq.quant.parity import check_parity  # noqa: E402
from dfq.spec import JobSpec  # noqa: E402

TEACHERS = [("resnet20", (1, 28, 28)), ("resnet18", (3, 64, 64)), ("mobilenet_v2", (3, 64, 64))]


def teacher(arch: str, shape: tuple[int, int, int]) -> tuple[torch.nn.Module, str, tuple[int, ...]]:
    for name, entry in read_manifest().items():
        if entry["arch"] == arch:
            model, info = load_bundled(name)
            return model, name, tuple(info.input_shape)
    torch.manual_seed(0)
    model = build_model(arch, 10, shape[0]).train()
    with torch.no_grad():
        model(torch.randn(16, *shape))
    return model.eval(), f"{arch} (random weights)", shape


def bench_one(model: torch.nn.Module, shape: tuple[int, ...], bits: str, threads: int, tmp: Path) -> dict:
    spec = JobSpec.model_validate({"bits": bits})
    student = quantize(model, spec.quant)
    set_calibration(student, True)
    with torch.no_grad():
        for _ in range(3):
            student(torch.randn(16, *shape))
    set_calibration(student, False)
    student.eval()
    qdq, fp32, packed = tmp / "q.onnx", tmp / "f.onnx", tmp / "p.safetensors"
    export_onnx(build_deploy_module(student)[0], shape, qdq)
    fp32_model = build_deploy_module(student, quantized=False)[0]
    export_onnx(fp32_model, shape, fp32)
    p = save_packed(student, packed)
    parity = check_parity(student, qdq, torch.randn(32, *shape), raise_on_failure=False)
    fp32_bytes = sum(v.numel() * 4 for v in fp32_model.state_dict().values() if v.is_floating_point())
    return {
        "bits": bits,
        "fp32_bytes": fp32_bytes,
        "packed_bytes": p["bytes"],
        "ratio": round(fp32_bytes / p["bytes"], 2),
        "weights_packed_bytes": p["weight_bytes_packed"],
        "fp32_onnx_bytes": fp32.stat().st_size,
        "qdq_onnx_bytes": qdq.stat().st_size,
        "latency_fp32": [measure_latency(fp32, shape, b, threads, budget_s=4) for b in (1, 32)],
        "latency_qdq": [measure_latency(qdq, shape, b, threads, budget_s=4) for b in (1, 32)],
        "kernels": kernel_counts(qdq, threads),
        "parity": {
            k: parity[k] for k in ("max_abs_rel", "cosine_min", "cosine_mean", "top1_agreement", "passed")
        },
    }


def table(results: list[dict]) -> str:
    lines = [
        "| teacher | bits | FP32 | packed | ratio | FP32 ONNX b1 ms | QDQ b1 ms | FP32 ONNX b32 ms | QDQ b32 ms | int kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f1, f32 = r["latency_fp32"]
        q1, q32 = r["latency_qdq"]
        lines.append(
            f"| {r['teacher']} | {r['bits']} | {r['fp32_bytes'] / 2**20:.2f} MiB | {r['packed_bytes'] / 2**20:.2f} MiB "
            f"| {r['ratio']}x | {f1['median_ms']} | {q1['median_ms']} | {f32['median_ms']} | {q32['median_ms']} "
            f"| {r['kernels']['integer_kernels']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", nargs="+", default=["W2A2", "W3A3", "W4A4", "W8A8"])
    ap.add_argument("--archs", nargs="+", default=[a for a, _ in TEACHERS])
    ap.add_argument(
        "--threads", type=int, default=1, help="onnxruntime and torch threads (1 on a shared machine)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, shape in TEACHERS:
            if arch not in args.archs:
                continue
            model, name, in_shape = teacher(arch, shape)
            for bits in args.bits:
                t = time.perf_counter()
                r = {
                    "teacher": name,
                    "input": list(in_shape),
                    **bench_one(model, in_shape, bits, args.threads, Path(tmp)),
                }
                results.append(r)
                print(f"{name} {bits}: done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    meta = {
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = table(results)
    out.with_suffix(".md").write_text(md + "\n")
    print(json.dumps(meta))
    print(md)


if __name__ == "__main__":
    main()
