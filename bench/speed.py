"""Speed benchmark: iterations/s, images/s and peak memory of the quantization loop.

One iteration = one generator step + one student step (post-warm-up, so both networks train).
Each configuration runs in its own process, so peak memory (RSS on CPU, max allocated on CUDA) is its
own. Optionally writes a torch.profiler table of where the time goes.

    python bench/speed.py --teachers resnet20_fmnist --methods gdfq dsg --bits W4A4 --iters 10
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(
    teacher: str,
    method: str,
    bits: str,
    batch: int,
    iters: int,
    warmup: int,
    device: str,
    threads: int | None,
    profile: Path | None,
) -> dict:
    import torch

    from dfq.models.teachers import load_bundled
    from dfq.pipeline import Pipeline, resolve_device
    from dfq.quant import set_calibration
    from dfq.spec import JobSpec

    if threads:
        torch.set_num_threads(threads)
    model, info = load_bundled(teacher)
    spec = JobSpec.model_validate(
        {
            "method": method,
            "bits": bits,
            "device": device,
            # no warm-up phase: every measured iteration steps both G and S; DSG margins are fixed
            # and FDDA centers are computed up front (their one-off cost is not per-iteration)
            "budget": {
                "preset": "cpu",
                "batch_size": batch,
                "warmup_epochs": 1,
                "iters_per_epoch": 1,
                "epochs": 1000,
            },
        }
    )
    dev = resolve_device(device)
    pipe = Pipeline(spec, model, info.num_classes, info.input_shape, dev)
    pipe.step = 1  # past the one-iteration warm-up epoch
    set_calibration(pipe.student, True)
    for _ in range(warmup):
        pipe.train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        pipe.train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "teacher": teacher,
        "method": method,
        "bits": bits,
        "batch": batch,
        "iters": iters,
        "s_per_it": dt / iters,
        "it_per_s": iters / dt,
        "img_per_s": iters * batch / dt,
        "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mem_kind": "cuda max_allocated" if dev.type == "cuda" else "process peak RSS",
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
    }
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof_ctx

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with prof_ctx(activities=acts) as prof:
            for _ in range(min(iters, 3)):
                pipe.train_step()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        profile.write_text(prof.key_averages().table(sort_by=key, row_limit=25))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--teachers", nargs="+", default=["resnet20_fmnist", "resnet18_fmnist", "mobilenetv2_fmnist"]
    )
    p.add_argument("--methods", nargs="+", default=["gdfq", "dsg", "fdda", "acq", "lrq"])
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"])
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CPU, 256 on CUDA")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table per configuration")
    p.add_argument("--name", default=None, help="results file stem (default speed-<device>)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) in this process
    args = p.parse_args(argv)
    if args.one:
        cfg = json.loads(args.one)
        cfg["profile"] = Path(cfg["profile"]) if cfg["profile"] else None
        print(json.dumps(measure(**cfg)))
        return 0
    batch = args.batch or (256 if args.device.startswith("cuda") else 128)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"speed-{args.device.replace(':', '')}"
    rows = []
    for teacher in args.teachers:
        for method in args.methods:
            for bits in args.bits:
                prof = results_dir / f"{stem}-profile-{teacher}-{method}-{bits}.txt" if args.profile else None
                cfg = {
                    "teacher": teacher,
                    "method": method,
                    "bits": bits,
                    "batch": batch,
                    "iters": args.iters,
                    "warmup": args.warmup,
                    "device": args.device,
                    "threads": args.threads,
                    "profile": str(prof) if prof else None,
                }
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(cfg)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{teacher:20s} {method:8s} {bits:6s} {row['s_per_it']:.3f} s/it {row['img_per_s']:.0f} img/s {row['peak_mem_mb']:.0f} MB",
                    flush=True,
                )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "batch": batch,
    }
    (results_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(
        "\n| teacher | method | bits | batch | s/it | it/s | img/s | peak MB | threads | device |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['teacher']} | {r['method']} | {r['bits']} | {r['batch']} | {r['s_per_it']:.3f} | {r['it_per_s']:.2f} | {r['img_per_s']:.0f} | {r['peak_mem_mb']:.0f} | {r['threads']} | {r['device']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
