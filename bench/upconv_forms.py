"""Which form of the generator's nearest-upsample + 3x3 conv is fastest, forward and backward?

Why: under bf16 the generator's second upsample conv (128 -> 64 channels, 14x14 -> 28x28, batch 128)
has the largest backward of the whole iteration in the profile (docs/benchmarks.md, "Against the
reference on cpu-epyc-dec7f"), and a transposed conv's backward is a strided conv, which oneDNN may
run less well than a plain one. So the same linear map in three forms, at the generator's two shapes:

- ``transposed``: what dfq runs (``speed.fused_upsample``, dfq/synth/upconv.py): one stride-2
  transposed conv with the folded 4x4 kernel;
- ``phases``: the four output phases as one stride-1 2x2 conv with 4x the output channels on the
  low-resolution input (padding 1), each phase cut from its output and interleaved (the same 4/9 of
  the multiply-adds, all in a plain conv);
- ``plain``: ``conv3x3(interpolate(x, 2))``, the reference's form (``speed.fused_upsample: false``).

Each form runs in channels-last as the loop does, in float32 and under bf16 autocast; the table holds
the best of ``--reps`` forward+backward timings and the largest difference of the output and both
gradients from ``transposed`` (relative to its largest magnitude).

    .venv/bin/python bench/upconv_forms.py --threads 2 --name upconv-forms-dec7f
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq.synth.upconv import transposed_kernel  # noqa: E402

SHAPES = [(128, 128, 7), (128, 64, 14)]  # (in, out, input side): the GDFQ generator's two at 28x28
NHWC = torch.channels_last


def transposed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv_transpose2d(x, transposed_kernel(w).contiguous(memory_format=NHWC), b, stride=2, padding=1)


def _phase_kernel(w: torch.Tensor) -> torch.Tensor:
    """``(O, I, 3, 3)`` -> ``(4 O, I, 2, 2)``: phase ``(a, b)``'s 2x2 kernel, phases in order 00, 01, 10, 11
    (dfq/synth/upconv.py: phase 0 sees rows ``(i-1, i)`` with ``(w0, w1 + w2)``, phase 1 rows ``(i, i+1)``
    with ``(w0 + w1, w2)``)."""

    def fold(k: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
        k0, k1, k2 = k.unbind(dim)
        return torch.stack([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], dim)

    return torch.cat([fold(fold(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)])


def phases(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n, _, h, wd = x.shape
    o = w.shape[0]
    y = F.conv2d(x, _phase_kernel(w).contiguous(memory_format=NHWC), padding=1)  # (n, 4 o, h + 1, w + 1)
    last = y.permute(0, 2, 3, 1)  # NHWC storage: this view is contiguous
    cut = [
        last[:, a : a + h, c : c + wd, (2 * a + c) * o : (2 * a + c + 1) * o] for a in (0, 1) for c in (0, 1)
    ]
    out = torch.stack(cut, 3).view(n, h, wd, 2, 2, o).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * wd, o)
    return (out + b).permute(0, 3, 1, 2)


def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2), w.contiguous(memory_format=NHWC), b, padding=1)


FORMS = {"transposed": transposed, "phases": phases, "plain": plain}


def measure(form, x0, w0, b0, grad, bf16: bool, reps: int) -> tuple[float, tuple[torch.Tensor, ...]]:
    x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))

    def step() -> torch.Tensor:
        x.grad = w.grad = b.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = form(x, w, b)
        y.float().backward(grad)
        return y

    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        y = step()
        best = min(best, time.perf_counter() - t0)
    return best, (y.detach().float(), x.grad.clone(), w.grad.clone())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--name", default="upconv-forms")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for cin, cout, side in SHAPES:
        x = torch.randn(args.batch, cin, side, side).contiguous(memory_format=NHWC)
        w = torch.randn(cout, cin, 3, 3) * 0.05
        b = torch.randn(cout)
        grad = torch.randn(args.batch, cout, 2 * side, 2 * side).contiguous(memory_format=NHWC)
        for bf16 in (False, True):
            ref = None
            for name, form in FORMS.items():
                seconds, out = measure(form, x, w, b, grad, bf16, args.reps)
                ref = ref or out
                diff = [float((a - r).abs().max() / r.abs().max()) for a, r in zip(out, ref, strict=True)]
                rows.append(
                    {"shape": f"{cin}->{cout} @{side}x{side}", "dtype": "bf16" if bf16 else "float32",
                     "form": name, "ms": round(seconds * 1e3, 1), "rel_diff_y_gx_gw": diff}
                )  # fmt: skip
                print(rows[-1], flush=True)
    lines = [
        f"threads {args.threads}, batch {args.batch}, best of {args.reps} forward+backward",
        "",
        "| shape | dtype | form | fwd+bwd ms | rel. diff y / grad x / grad w vs transposed |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['dtype']} | {r['form']} | {r['ms']} | "
        + " / ".join(f"{d:.1e}" for d in r["rel_diff_y_gx_gw"])
        + " |"
        for r in rows
    ]
    print("\n".join(lines))
    out = ROOT / "bench" / "results"
    meta = {"threads": args.threads, "batch": args.batch, "reps": args.reps, "torch": torch.__version__}
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
