"""Are runs comparable seed by seed across CPU types? A two-minute check instead of a 12-minute run.

The same code, spec and seed gave GDFQ resnet20_fmnist W3A3 seed 1 86.07 on one AMD EPYC (AVX-512),
83.08 on an Intel Xeon (AVX-512) and 71.58 on an AMD EPYC that exposes only AVX2: each library picks
its kernels by the instruction set at run time. ``bench/quality.py --isa avx2`` caps them all at AVX2.
This probe runs the first 16 iterations of that job (cpu-budget batch, one thread) once per ``--isa``
and fingerprints every logged loss of every step (``it_per_s`` left out: it is a timing). Equal
fingerprints on two machines mean bit-identical loops; the reference below was recorded on a machine
whose CPU offers only AVX2 (cpu-epyc-dec3), where ``native`` and ``avx2`` are the same run.

    .venv/bin/python bench/isa_probe.py --isa native avx2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality import ROOT, child_env, provenance  # noqa: E402

SPEC = {
    "method": "gdfq",
    "bits": "W3A3",
    "seed": 1,
    "eval": "fashion-mnist",
    "export": {"latency": False},  # a timing, not part of the loop
    "budget": {
        "preset": "cpu",
        "epochs": 2,
        "iters_per_epoch": 8,
        "warmup_epochs": 1,
        "lr_milestones": [],
        "eval_every": 0,
        "eval_limit": 500,
    },
}
# Recorded with this file's SPEC on cpu-epyc-dec3 (AMD EPYC, AVX2 only, torch 2.14.1), code of 2026-12-03.
REFERENCE = {"isa": "avx2", "fingerprint": "2131a11bff1e", "machine": "cpu-epyc-dec3"}


def fingerprint(metrics: Path) -> tuple[str, dict]:
    """A short hash of every logged value but the timing, and the last step's row."""
    rows = [{k: v for k, v in json.loads(line).items() if k != "it_per_s"} for line in metrics.open()]
    digest = hashlib.sha1(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    return digest, rows[-1]


def probe(isa: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "dfq.cli", "quantize", "--teacher", "resnet20_fmnist"]
    cmd += ["--spec", json.dumps(SPEC), "--out", str(out), "--threads", "1", "--quiet", "--force"]
    subprocess.run(cmd, cwd=ROOT, check=True, env=child_env(isa), stdout=subprocess.DEVNULL)
    digest, last = fingerprint(out / "metrics.jsonl")
    return {
        "isa": isa,
        "fingerprint": digest,
        "s_loss": last["s_loss"],
        "g_loss": last["g_loss"],
        "matches_reference": digest == REFERENCE["fingerprint"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", nargs="+", default=["native", "avx2"])
    p.add_argument("--name", default="isa-probe")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [probe(isa, Path(tmp) / isa) for isa in args.isa]
    lines = [
        f"| isa | fingerprint | last s_loss | last g_loss | equals the {REFERENCE['machine']} AVX2 reference |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['isa']} | {r['fingerprint']} | {r['s_loss']:.6f} | {r['g_loss']:.6f} | "
        f"{'yes' if r['matches_reference'] else 'no'} |"
        for r in rows
    ]
    table = "\n".join(lines) + "\n"
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    # The machine and code; each row names its own cap, so provenance's single-cap fields would mislead.
    code = {k: v for k, v in provenance().items() if k not in ("isa", "isa_env")}
    record = {"spec": SPEC, "reference": REFERENCE, "code": code, "rows": rows}
    (results / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
