"""Weight-rounding probe: the steps after training (``quant.weight_round``, ``quant.bias_correct``) tried again
on a finished job's generator, without training it again.

Why: at the ``calibrate`` budget the student is never stepped, so a finished job's generator is all that a
rounding variant needs; its 800 steps are most of a 20-minute job, the rounding and correction a few
minutes. The probe rebuilds the job's pipeline (``dfq.job.build_pipeline``, as the job
did) with the job's spec and ``--quant`` merged over its quant
section, loads the job's generator (``generator.safetensors``), leaves the student as the spec
builds it with the activation ranges the job ended with (a ``calibrate`` student is never stepped, so
its weights before rounding are the teacher's; its ranges come from the teacher's BN or, where no BN
describes them, from the generator's images of the calibration epochs, so they are read from the job's
``quantized.safetensors``, which rounding and correction do not change unless the job learnt them,
``quant.round_act: lsq``, which the probe refuses), runs the rounding and the correction, and evaluates on
the full test set. With ``--quant '{}'`` it must repeat the job's own result to the digit, which is the
check that it is the same computation (run it first; each row prints the job's figure beside its own).
Run it under the job's instruction-set cap (``--isa``, as bench/quality.py) and thread count.

    .venv/bin/python bench/round_probe.py runs/c40d75/<run> --isa avx2 --threads 1 \\
        --quant '{}' '{"round_images": 4096}' --name round-probe-s4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import child_env, provenance  # noqa: E402


def probe(run: Path, quant: dict, threads: int) -> dict:
    """One variant, in this process (the caller's environment carries the ISA cap)."""
    import torch
    from safetensors.torch import load_file

    from dfq.job import build_pipeline
    from dfq.models.teachers import resolve_teacher
    from dfq.spec import JobSpec, _merge

    torch.set_num_threads(threads)
    report = json.loads((run / "report.json").read_text())
    data = report["spec"]
    if data["quant"].get("round_act", "fixed") != "fixed":  # the job's own switch, before the variant's
        raise SystemExit(
            f"{run}: its rounding learnt the activation ranges, so its final ranges are not training's"
        )
    data["quant"] = _merge(data["quant"], quant)
    spec = JobSpec.model_validate(data)
    if spec.budget.student_steps:
        raise SystemExit(
            f"{run}: its student was trained ({spec.budget.student_steps} steps); the probe needs a calibrate job"
        )
    pipe = build_pipeline(spec, *resolve_teacher(report["teacher"]["name"]))
    pipe.generator.load_state_dict(load_file(run / "generator.safetensors"))
    # the activation ranges the job ended with: bn-mse fixes those behind a BN at construction, the rest
    # (after a residual add) are observed on the generator's images during the calibration epochs
    final = load_file(run / "quantized.safetensors")
    ranges = {k: v for k, v in final.items() if k.rsplit(".", 1)[-1] in ("raw_min", "raw_max", "updates")}
    missing = set(ranges) - set(pipe.student.state_dict())
    if missing:
        raise SystemExit(
            f"{run}: the job's student has quantizers this spec's does not: {sorted(missing)[:3]}"
        )
    pipe.student.load_state_dict(ranges, strict=False)
    pipe.step = pipe.total
    pipe.run()
    result = pipe.evaluate()
    return {
        "quant": quant,
        "q_top1": result["q_top1"],
        "n_eval": result["n_eval"],
        "job_q_top1": report["q_top1"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished calibrate job's output folder")
    p.add_argument(
        "--quant", nargs="+", required=True, help="JSON merged over the job's quant section, one per variant"
    )
    p.add_argument("--isa", default="native")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", required=True)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(probe(args.run, json.loads(args.one), args.threads)))
        return
    rows = []
    for text in args.quant:
        cmd = [
            sys.executable,
            __file__,
            str(args.run),
            "--quant",
            text,
            "--threads",
            str(args.threads),
            "--name",
            args.name,
            "--one",
            text,
        ]
        done = subprocess.run(cmd, env=child_env(args.isa), capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"variant {text} failed:\n{done.stderr[-3000:]}")
        out = done.stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"| {text} | {rows[-1]['q_top1']:.2f} | {rows[-1]['job_q_top1']:.2f} |", flush=True)
    result = {
        "run": str(args.run),
        "isa": args.isa,
        "threads": args.threads,
        "code": provenance(args.isa),
        "rows": rows,
    }
    out_dir = ROOT / "bench" / "results"
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| quant over the job's | top-1 (10k) | the job's own |", "|---|---|---|"]
    table += [f"| `{json.dumps(r['quant'])}` | {r['q_top1']:.2f} | {r['job_q_top1']:.2f} |" for r in rows]
    (out_dir / f"{args.name}.md").write_text(f"Run: {args.run}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
