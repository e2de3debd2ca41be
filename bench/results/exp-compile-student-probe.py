"""Probe (2026-12-02, not a benchmark): eager vs torch.compile (inductor, CPU) on the quantized
resnet20_fmnist student's forward + backward at batch 128, channels_last, 1 thread.

ActQuant's ``.item()`` calls break the graph 26 times; ``--no-item`` swaps in a tensor-only forward
(same values) so dynamo captures one graph.  Run: ``.venv/bin/python bench/results/exp-compile-student-probe.py``
"""

import sys
import time

import torch

from dfq.models.teachers import load_bundled
from dfq.quant import modules, quantize, set_calibration
from dfq.quant.quantizer import fake_quantize
from dfq.spec import QuantSpec


def tensor_only_forward(self: modules.ActQuant, x: torch.Tensor) -> torch.Tensor:
    if self.calibrating:
        self.observe(x)
    corr = 1 - self.beta ** self.updates.to(torch.float32)
    return fake_quantize(x, self.bits, self.raw_min / corr, self.raw_max / corr)


def main() -> None:
    torch.set_num_threads(1)
    if "--no-item" in sys.argv:
        modules.ActQuant.forward = tensor_only_forward
    teacher, _ = load_bundled("resnet20_fmnist")
    student = quantize(teacher.eval(), QuantSpec()).eval()
    x = torch.randn(128, 1, 28, 28)
    set_calibration(student, True)
    with torch.no_grad():
        student(x)
    set_calibration(student, False)
    student = student.to(memory_format=torch.channels_last)

    def step(m: torch.nn.Module) -> torch.Tensor:
        out = m(x)
        out.logsumexp(1).mean().backward()
        return out

    def per_step(m: torch.nn.Module, n: int = 5) -> float:
        step(m)
        t0 = time.perf_counter()
        for _ in range(n):
            step(m)
        return (time.perf_counter() - t0) / n

    print(f"eager s/step {per_step(student):.3f}")
    compiled = torch.compile(student)
    t0 = time.perf_counter()
    out = step(compiled)
    print(f"compile + first step s {time.perf_counter() - t0:.1f}")
    print(f"compiled s/step {per_step(compiled):.3f}")
    print(f"max |compiled - eager| {(out - student(x)).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
