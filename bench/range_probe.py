"""Probe: what the activation-range rule alone costs at low bit-widths, before any fine-tuning.

Real images are used only to *measure* (never in a job): the teacher is quantized and evaluated as it
is, with activation ranges (1) calibrated on 256 real training images (min/max EMA, the reference rule
on real data), (2) the same narrowed to the least-squared-error fraction of each range on 128 of those
images ("real-mse", what a least-error rule could win with real data), (3) ``quant.act_clip = "bn-mse"``
(data-free: BN-fed sites from the teacher's BN, the other sites as in (1)), (4) the same with
``quant.act_equalize = "depthwise"`` ("bn-mse-eq": each channel feeding a depthwise conv on its own BN
range, dfq/quant/equalize.py), (5) the same with ``quant.act_mse_weight = "consumer"`` ("bn-mse-eq-cw":
the pooled sites' channels weighted by what their consumer feels, dfq/quant/consumers.py). It separates the range rule
from everything a data-free job adds (synthetic images, fine-tuning).

    python bench/range_probe.py --teachers resnet20_fmnist mobilenetv2_fmnist --bits W32A4 W4A4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfq.data import load_eval_set
from dfq.evaluate import evaluate_pair
from dfq.models.teachers import load_bundled
from dfq.quant import ActQuant, quantize, set_calibration
from dfq.quant.bn_ranges import set_ranges_from_bn
from dfq.quant.quantizer import mse_clipped_range
from dfq.spec import JobSpec

RESULTS = Path(__file__).resolve().parent / "results"


def calibrated(teacher: torch.nn.Module, bits: str, rule: str, x: torch.Tensor, shape) -> torch.nn.Module:
    student = quantize(teacher, JobSpec.model_validate({"bits": bits, "device": "cpu"}).quant)
    if rule.startswith("bn-mse"):
        weighting = "consumer" if rule.endswith("-cw") else "uniform"
        set_ranges_from_bn(student, shape, weighting, equalize=rule.startswith("bn-mse-eq"))
    set_calibration(student, True)
    with torch.no_grad():
        for i in range(0, len(x), 64):
            student(x[i : i + 64])
    set_calibration(student, False)
    if rule == "real-mse":
        quants = {m: [] for m in student.modules() if isinstance(m, ActQuant)}
        hooks = [m.register_forward_pre_hook(lambda m, a: quants[m].append(a[0])) for m in quants]
        with torch.no_grad():
            student(x[:128])
        for h in hooks:
            h.remove()
        for m, seen in quants.items():
            m.fix_range(*(float(v) for v in mse_clipped_range(torch.cat(seen), m.bits, *m.range())))
    return student.eval()


RULES = ("minmax", "real-mse", "bn-mse", "bn-mse-eq", "bn-mse-eq-cw")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teachers", nargs="+", default=["resnet20_fmnist", "resnet18_fmnist", "mobilenetv2_fmnist"]
    )
    p.add_argument("--bits", nargs="+", default=["W32A4", "W4A4", "W3A3"])
    p.add_argument("--limit", type=int, default=2000, help="test images evaluated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="range-probe")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.teachers:
        teacher, info = load_bundled(name)
        ev = load_eval_set("fashion-mnist", info.input_shape, limit=args.limit)
        x = info.preprocess(load_eval_set("fashion-mnist-train", info.input_shape, limit=256).images)
        for bits in args.bits:
            row = {"teacher": name, "bits": bits}
            for clip in RULES:
                student = calibrated(teacher, bits, clip, x, info.input_shape)
                r = evaluate_pair(teacher, student, ev, info.preprocess)
                row |= {
                    "fp_top1": r["fp_top1"],
                    f"{clip}_top1": r["q_top1"],
                    f"{clip}_agreement": r["agreement"],
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| teacher | bits | FP top-1 | " + " | ".join(f"{c} top-1 (agreement)" for c in RULES) + " |",
        "|---|---|---|" + "---|" * len(RULES),
        *(
            f"| {r['teacher']} | {r['bits']} | {r['fp_top1']:.2f} | "
            + " | ".join(f"{r[c + '_top1']:.2f} ({r[c + '_agreement']:.2f})" for c in RULES)
            + " |"
            for r in rows
        ),
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"limit": args.limit, "rows": rows}, indent=1))
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
