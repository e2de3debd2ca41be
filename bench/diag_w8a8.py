"""Diagnosis of a W8A8 accuracy drop: is it the quantizer, the activation ranges or the fine-tuning?

Uses real data only to *measure* (never to quantize): (1) the teacher quantized with ranges calibrated
on 256 real training images, no fine-tuning; (2) the finished run's student as it is; (3) the same
with its activation ranges re-calibrated on those real images. If (1) is near FP and (2) ~ (3), the
loss came from the distillation fine-tuning of the weights.

    python bench/diag_w8a8.py mobilenetv2_fmnist RUN_DIR [--limit 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfq.artifacts import load_quantized
from dfq.data import load_eval_set
from dfq.evaluate import evaluate_pair
from dfq.models.teachers import load_bundled
from dfq.quant import quantize, set_calibration
from dfq.spec import JobSpec


def calibrate(student: torch.nn.Module, x: torch.Tensor) -> None:
    set_calibration(student, True)
    with torch.no_grad():
        for i in range(0, len(x), 64):
            student(x[i : i + 64])
    set_calibration(student, False)
    student.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher")
    p.add_argument("run_dir")
    p.add_argument("--limit", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)
    teacher, info = load_bundled(args.teacher)
    ev = load_eval_set("fashion-mnist", info.input_shape, limit=args.limit)
    x = info.preprocess(load_eval_set("fashion-mnist-train", info.input_shape, limit=256).images)
    fresh = quantize(teacher, JobSpec.model_validate({"bits": "W8A8", "device": "cpu"}).quant)
    calibrate(fresh, x)
    print("W8A8, real-data ranges, no fine-tuning:", evaluate_pair(teacher, fresh, ev, info.preprocess))
    run, _, _ = load_quantized(Path(args.run_dir) / "quantized.safetensors")
    run.eval()
    print("the run's student as it is:", evaluate_pair(teacher, run, ev, info.preprocess))
    calibrate(run, x)
    print(
        "the run's student, ranges re-calibrated on real data:",
        evaluate_pair(teacher, run, ev, info.preprocess),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
