"""Quality benchmark: methods x bit-widths x teachers at a named budget, over seeds.

Each run is a separate ``dfq quantize`` process (so its peak memory is its own and a crash loses only
that run); finished runs are reused, so an interrupted benchmark picks up where it stopped.
Writes ``bench/results/quality-<budget>.json`` and ``.md`` and prints the table.

    python bench/quality.py --budget cpu --methods gdfq --bits W8A8 W4A4 W3A3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq.models.teachers import read_manifest  # noqa: E402
from dfq.spec import _merge  # noqa: E402  (the spec's own deep merge of overrides)

# The same code, spec and seed give other W3A3 results on another CPU type (docs/benchmarks.md, "The
# same seed on another CPU"): PyTorch's own kernels, oneDNN's convolutions and MKL's GEMMs each pick
# their code path, hence their float summation order, by the instruction set the CPU offers at run
# time, and the loop amplifies the last bits into points. Capping all three at one instruction set
# that most x86 CPUs have makes runs on different machines of one vendor comparable seed by seed (AMD
# EPYC with and without AVX-512: bit for bit; an Intel Xeon capped at AVX2 still computes other sums,
# docs/benchmarks.md "Why the CPU type matters"). These variables
# are read when each library starts, so they only work in a fresh process: here, each run's own.
ISA_ENV: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}
ISA_VARS = tuple(ISA_ENV["avx2"])  # the variables a cap sets, named once


def child_env(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one run: ``base`` (the benchmark's own) with the ``isa`` cap applied; a capped
    run must not inherit a different cap, so ``native`` keeps whatever the caller exported."""
    if isa not in ISA_ENV:
        raise ValueError(f"unknown --isa {isa!r}; known: {', '.join(ISA_ENV)}")
    env = dict(os.environ if base is None else base)
    env.update(ISA_ENV[isa])
    return env


def parse_method(arg: str) -> tuple[str, str | dict]:
    """``acq`` (a preset, combinable with '+') or ``label={"preset": "gdfq", "acq": {...}}`` (a custom
    MethodSpec under a short label, for ablations)."""
    if "=" not in arg:
        return arg, arg
    label, text = arg.split("=", 1)
    return label, json.loads(text)


def run_one(
    teacher: str,
    method: str,
    bits: str,
    budget: str,
    seed: int,
    runs_dir: Path,
    extra: dict,
    threads: int | None,
    isa: str = "native",
) -> dict:
    """One ``dfq quantize`` process; a run that fails (e.g. a diverged student) is returned as a failure
    row with its error, so the other runs of the benchmark still happen."""
    label, method_spec = parse_method(method)
    # Overrides make the tag unique but unreadable; a short hash keeps directory names plain.
    payload = [extra, method_spec] if isinstance(method_spec, dict) else extra  # presets: tags as before
    digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]
    custom = extra or isinstance(method_spec, dict)
    tag = f"{teacher}-{label}-{bits}-{budget}-s{seed}" + (f"-x{digest}" if custom else "")
    tag += "" if isa == "native" else f"-isa-{isa}"  # a capped run is another run, never reused for one
    out = runs_dir / tag
    spec = {"method": method_spec, "bits": bits, "budget": budget, "seed": seed, "eval": "fashion-mnist"}
    spec = _merge(spec, extra)
    cmd = [
        sys.executable,
        "-m",
        "dfq.cli",
        "quantize",
        "--teacher",
        teacher,
        "--spec",
        json.dumps(spec),
        "--out",
        str(out),
        "--quiet",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env(isa))
    if proc.returncode != 0:
        error = failure_reason(proc.stderr, proc.returncode)
        print(f"  {tag}: FAILED ({error})", flush=True)
        return {
            "failed": True,
            "error": error,
            "tag": tag,
            "label": label,
            "teacher": teacher,
            "bits": bits,
            "seed": seed,
        }
    report = json.loads((out / "report.json").read_text())
    report["label"] = label
    print(
        f"  {tag}: q_top1 {report['q_top1']:.2f} (FP {report['fp_top1']:.2f}) in {time.time() - t0:.0f}s",
        flush=True,
    )
    return report


def failure_reason(stderr: str, returncode: int) -> str:
    """The line that says why a run failed: dfq's own ``error:`` line, else the end of the message
    (a spec rejected by pydantic ends in a link to its docs, which says nothing about this run)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
    if error:
        return error
    tail = [ln for ln in lines[-6:] if not ln.startswith("For further information")]
    return " ".join(tail)[:400] or f"exit status {returncode}"


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def per_seed(r: dict) -> dict:
    """One run's own figures: the table shows mean ± std, but a 2-3 seed mean of a loop this chaotic is
    only readable next to its seeds."""
    return {
        "seed": r["seed"],
        "q_top1": r["q_top1"],
        "q_top1_best_epoch": (r.get("best_epoch") or {}).get("q_top1"),
        "agreement": r["agreement"],
        "wall_s": r["wall_s"],
    }


def cpuinfo_fields(lines: list[str]) -> dict[str, str]:
    """``/proc/cpuinfo``'s fields of the first core (later cores repeat them)."""
    fields: dict[str, str] = {}
    for ln in lines:
        key, _, value = ln.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model(fields: dict[str, str]) -> str:
    """Family, model and stepping: the model name ("AMD EPYC") hides which CPU a virtual machine got,
    and two of them with the same name have offered different instruction sets."""
    parts = [f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if fields.get(k)]
    return " ".join(parts)


def provenance(isa: str = "native") -> dict:
    """Which code and machine produced a results file: figures from different code versions or machines
    are not on one scale (float reassociation moves W3A3 runs by points; contention moves wall time).
    ``cpu_capability`` is what this machine's PyTorch picks on its own; ``isa_env`` what the runs were
    capped to (empty: each library chose for itself)."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    cpuinfo = Path("/proc/cpuinfo")
    fields = cpuinfo_fields(cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
    flags = fields.get("flags", "").split()
    import torch  # only here: the benchmark itself runs every job in its own process

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_engine": bool(git("status", "--porcelain", "--", "dfq")),
        "cpu": fields.get("model name", platform.processor()),
        "cpu_model": cpu_model(fields),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": isa,
        "isa_env": {k: v for k, v in child_env(isa).items() if k in ISA_VARS},
    }


def schedule(report: dict) -> dict | None:
    """The budget as it resolved: the preset's name and the overrides alone stop saying which schedule
    a run had as soon as a preset's defaults change (a warm-up length was tried for ``cpu`` on 2026-12-03)."""
    spec = report.get("spec")
    if not spec:
        return None
    return {"budget": spec["budget"], "calibration_epochs": spec["quant"]["calibration_epochs"]}


def aggregate(reports: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    failures = [r for r in reports if r.get("failed")]
    for r in reports:
        if not r.get("failed"):
            groups.setdefault((r["teacher"]["name"], r["label"], r["bits"], r["layers"]), []).append(r)
    rows = [
        {
            "teacher": f["teacher"],
            "method": f["label"],
            "bits": f["bits"],
            "seeds": [f["seed"]],
            "failed": f["error"],
        }
        for f in failures
    ]
    for (teacher, method, bits, layers), rs in groups.items():
        rows.append(
            {
                "teacher": teacher,
                "method": method,
                "bits": bits,
                "layers": layers,
                "kd_reduction": rs[0]["kd_reduction"],
                "act_range": rs[0]["act_range"],
                "act_clip": rs[0].get("act_clip", "minmax"),  # reports before 2026-12-05 lack these two
                "act_ste": rs[0].get("act_ste", "identity"),
                "act_equalize": rs[0].get("act_equalize", "none"),  # reports before 2026-12-06 lack it
                "act_mse_weight": rs[0].get("act_mse_weight", "uniform"),  # before 2026-12-06 (second)
                "weight_round": rs[0].get("weight_round", "nearest"),  # before 2026-12-06 (fourth)
                "seeds": [r["seed"] for r in rs],
                "per_seed": [per_seed(r) for r in rs],
                "fp_top1": rs[0]["fp_top1"],
                "q_top1": _stats([r["q_top1"] for r in rs]),
                "q_top1_best_epoch": _stats([r["best_epoch"]["q_top1"] for r in rs if r.get("best_epoch")])
                if all(r.get("best_epoch") for r in rs)
                else None,
                "best_epoch_n_eval": (rs[0].get("best_epoch") or {}).get("n_eval"),
                "agreement": _stats([r["agreement"] for r in rs]),
                "wall_s": _stats([r["wall_s"] for r in rs]),
                "it_per_s": _stats([r["it_per_s"] for r in rs]),
                "peak_mem_mb": max(r["peak_mem_mb"] for r in rs),
                "iterations": rs[0]["iterations"],
                "schedule": schedule(rs[0]),
                "n_eval": rs[0]["n_eval"],
                "device": rs[0]["device"],
                "threads": rs[0]["threads"],
            }
        )
    return rows


def markdown(rows: list[dict], budget: str) -> str:
    head = (
        "| teacher | method | bits | layers | FP top-1 | q top-1 (final) | by seed | q top-1 (best epoch*) | agreement | wall s | it/s | peak MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if r.get("failed"):
            lines.append(
                f"| {r['teacher']} | {r['method']} | {r['bits']} | | | **failed** (seed {r['seeds'][0]}): {r['failed']} | | | | | | |"
            )
            continue

        def pm(s):
            return (
                f"{s['mean']:.2f} ± {s['std']:.2f}"
                if s and s["n"] > 1
                else (f"{s['mean']:.2f}" if s else "-")
            )

        by_seed = ", ".join(f"s{p['seed']} {p['q_top1']:.2f}" for p in r["per_seed"])
        lines.append(
            f"| {r['teacher']} | {r['method']} | {r['bits']} | {r['layers']} | {r['fp_top1']:.2f} | {pm(r['q_top1'])} | {by_seed} | "
            f"{pm(r['q_top1_best_epoch'])} | {pm(r['agreement'])} | {r['wall_s']['mean']:.0f} | {r['it_per_s']['mean']:.2f} | {r['peak_mem_mb']:.0f} |"
        )
    seeds = sorted({s for r in rows for s in r["seeds"]})
    rows = [r for r in rows if not r.get("failed")]
    foot = (
        f"\nBudget `{budget}`, seeds {seeds} (mean ± sample std where n > 1), KD reduction `{rows[0]['kd_reduction'] if rows else ''}`, "
        f"activation ranges `{rows[0]['act_range'] if rows else ''}` / `{rows[0]['act_clip'] if rows else ''}` / STE `{rows[0]['act_ste'] if rows else ''}` / equalised `{rows[0]['act_equalize'] if rows else ''}` / channel weights `{rows[0]['act_mse_weight'] if rows else ''}` / weight rounding `{rows[0]['weight_round'] if rows else ''}`. Final-epoch top-1 on the full Fashion-MNIST test set (10,000 images).\n"
        f"*Best epoch: the best of the per-epoch evaluations on the first {rows[0]['best_epoch_n_eval'] if rows else '?'} test images "
        "(and of the one after learnt rounding, where there is one; "
        "test-set model selection, as the reference repositories report; not the headline).\n"
    )
    return head + "\n".join(lines) + "\n" + foot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="cpu")
    p.add_argument("--teachers", nargs="+", default=None, help="default: every bundled teacher")
    p.add_argument("--methods", nargs="+", default=["gdfq"])
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A4", "W3A3"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--name", default=None, help="results file stem (default quality-<budget>)")
    p.add_argument("--extra", default="{}", help="JSON merged into every spec (e.g. overrides)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each with --threads)")
    p.add_argument(
        "--isa",
        choices=sorted(ISA_ENV),
        default="native",
        help="cap PyTorch, oneDNN and MKL at one instruction set (avx2) so that seeds compare across CPU types "
        "of one vendor (not AMD against Intel)",
    )
    args = p.parse_args(argv)
    teachers = args.teachers or sorted(read_manifest())
    extra = json.loads(args.extra)
    jobs = [
        (teacher, method, bits, args.budget, seed, Path(args.runs_dir), extra, args.threads, args.isa)
        for teacher in teachers
        for method in args.methods
        for bits in args.bits
        for seed in args.seeds
    ]
    code = provenance(args.isa)  # before the runs: the tree they ran on, not one edited while they ran
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:  # each run is its own process
        reports = list(pool.map(lambda job: run_one(*job), jobs))
    rows = aggregate(reports)
    stem = args.name or f"quality-{args.budget}"
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(
        json.dumps({"budget": args.budget, "extra": extra, "code": code, "rows": rows}, indent=2) + "\n"
    )
    table = markdown(rows, args.budget + (f" + overrides {json.dumps(extra)}" if extra else ""))
    (results / f"{stem}.md").write_text(table)
    print(table)
    return 1 if any(r.get("failed") for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
