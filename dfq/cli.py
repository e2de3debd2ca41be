"""``dfq`` command line: quantize a teacher, train the bundled teachers.

``dfq quantize`` takes the same JobSpec as the API (``--spec`` JSON, or the common fields as flags,
flags winning), so a job started from a shell can be repeated through the service and vice versa.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def _parse_shape(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", " ").split()]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _read_spec_text(value: str) -> str:
    """``--spec`` is a JSON file's path or the JSON itself. JSON text longer than the OS allows for a
    file name (255 bytes) makes ``stat`` raise instead of answering "no such file", so text that opens
    like a JSON object is never taken for a path."""
    if value.lstrip().startswith("{"):
        return value
    return Path(value).read_text() if Path(value).is_file() else value


def _spec_from_args(args: argparse.Namespace) -> Any:
    from dfq.spec import JobSpec

    data: dict[str, Any] = {}
    if args.spec:
        data = json.loads(_read_spec_text(args.spec))
    for key in ("method", "bits", "budget", "quant", "seed", "device", "eval"):
        value = getattr(args, key)
        if value is not None:
            if key in ("method", "budget", "quant") and isinstance(data.get(key), dict):
                data[key] = {**data[key], "preset": value}
            else:
                data[key] = value
    return JobSpec.model_validate(data)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from dfq.job import load_completed, run_job
    from dfq.models.checkpoint import CheckpointError
    from dfq.pipeline import Cancelled
    from dfq.quant.parity import ParityError

    try:
        spec = _spec_from_args(args)
    except ValidationError as exc:
        print(f"invalid job spec:\n{exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = load_completed(out, spec)
    if done is not None and not args.force:
        print(f"{out} already holds a finished run of this spec (use --force to redo it)", file=sys.stderr)
        print(json.dumps(_headline(done), indent=2))
        return 0
    if args.force:
        (out / "report.json").unlink(missing_ok=True)

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: save state and stop cleanly; second: die
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this step (state is saved; run the same command to resume)", file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    print(f"dfq quantize: {spec.summary()} -> {out}", file=sys.stderr)
    bar = tqdm(total=spec.budget.total_iters, unit="it", disable=args.quiet, dynamic_ncols=True)

    def on_event(e) -> None:
        if e.kind == "phase" or e.kind == "checkpoint":
            bar.n = e.step
            bar.set_description(e.phase)
            bar.refresh()
        elif e.kind == "step":
            bar.n = e.step
            bar.set_postfix(g=f"{e.metrics['g_loss']:.3f}", s=f"{e.metrics['s_loss']:.3f}", refresh=False)
            bar.refresh()
        elif e.kind == "eval":
            bar.write(
                f"epoch {e.metrics['epoch']}: q_top1 {e.metrics['q_top1']:.2f} on {e.metrics['n_eval']} images"
            )

    try:
        report = run_job(spec, args.teacher, out, on_event, lambda: stop["requested"], arch=args.arch)
    except Cancelled as exc:
        bar.close()
        print(f"{exc}; state saved in {out}", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, FileNotFoundError, ParityError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    for warning in report.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(_headline(report), indent=2))
    return 0


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "method",
        "bits",
        "layers",
        "budget",
        "quant_preset",
        "seed",
        "fp_top1",
        "q_top1",
        "agreement",
        "agreement_synthetic",
        "wall_s",
        "it_per_s",
        "device",
    )
    out = {k: report[k] for k in keys if k in report}
    if "export" in report:  # deployable artifacts (issue 7); details in report.md
        ex = report["export"]
        out["export"] = {
            "parity_passed": ex["parity"]["passed"],
            "size_ratio": ex["size"]["ratio"],
            "files": sorted(ex["files"]),
        }
    return out


def cmd_train_teacher(args: argparse.Namespace) -> int:
    import torch

    from dfq.train_teacher import RECIPES, train_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(RECIPES) if args.name == "all" else [args.name]
    for name in names:
        if name not in RECIPES:
            print(f"unknown teacher {name!r}; known: {', '.join(RECIPES)}", file=sys.stderr)
            return 2
        train_teacher(name, Path(args.out) if args.out else None, args.epochs, seed=args.seed)
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    from dfq.models.teachers import read_manifest

    for name, e in sorted(read_manifest().items()):
        print(
            f"{name:22s} {e['arch']:14s} input {'x'.join(map(str, e['input_shape'])):8s} FP top-1 {e['fp_top1']:.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfq", description="data-free quantization of CNNs")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a teacher without real data")
    q.add_argument(
        "--teacher", required=True, help="bundled teacher name (see `dfq teachers`) or checkpoint path"
    )
    q.add_argument("--arch", help="registry architecture of a checkpoint file (e.g. resnet20, resnet18)")
    q.add_argument("--spec", help="JobSpec JSON (shorthand accepted) or a file holding it")
    q.add_argument("--method", help="method preset (gdfq)")
    q.add_argument("--bits", help="e.g. W4A4, W3A3, W4A4-F8L8")
    q.add_argument("--budget", help="budget preset: smoke, cpu, calibrate (no student step), paper")
    q.add_argument(
        "--quant", help="quantization preset: recon (dfq's best data-free recipe); default: the reference's"
    )
    q.add_argument("--seed", type=int)
    q.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    q.add_argument("--eval", help="labelled set for accuracy: fashion-mnist, a .npz, an ImageFolder")
    q.add_argument("--out", required=True, help="output directory (re-use it to resume an interrupted run)")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--force", action="store_true", help="redo a run whose report already exists")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train-teacher", help="train a bundled Fashion-MNIST teacher")
    t.add_argument("name", help="resnet20_fmnist, resnet18_fmnist, mobilenetv2_fmnist or all")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="directory for weights and manifest (default: teachers/)")
    t.add_argument("--threads", type=int)
    t.set_defaults(func=cmd_train_teacher)

    ls = sub.add_parser("teachers", help="list bundled teachers")
    ls.set_defaults(func=cmd_teachers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
