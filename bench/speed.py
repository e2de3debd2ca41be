"""Speed benchmark: iterations/s, images/s and peak memory of the quantization loop.

One iteration = one generator step + one student step, measured in the calibrate+finetune phase (both
networks train and activation ranges update: the most expensive phase). The warm-up iterations (at
least 1) also absorb one-off work: DSG margin estimation and zero-shot FDDA centers. Each configuration
runs in its own process, so peak memory (RSS on CPU, max allocated on CUDA) is its own. Besides wall
time it records the process CPU time per iteration, which a machine shared with other jobs inflates
less than wall time.

    python bench/speed.py --teachers resnet20_fmnist --methods gdfq dsg --bits W4A4 --iters 5
    # before/after: run every configuration in this tree and in another checkout, interleaved
    python bench/speed.py --vs-root ../base --name speed-ab
    # opt-in switches: --speed '{"bf16": true}'; --profile writes a torch.profiler table per configuration
    # a probe of other modules than the JobSpec switch (--speed '{"compile": true}' compiles the student and
    # generator): --compile teacher student generator (torch.compile in place; warmup_s shows
    # what compiling cost)

Writes bench/results/<name>.json and <name>.md and prints the table.
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
TEACHERS = ["resnet20_fmnist", "resnet18_fmnist", "mobilenetv2_fmnist"]
METHODS = ["gdfq", "dsg", "fdda", "acq", "lrq"]


def measure(
    teacher: str,
    method: str,
    bits: str,
    batch: int,
    iters: int,
    warmup: int,
    device: str,
    threads: int | None,
    profile: str | None,
    speed: dict | None,
    compile: list[str] | None = None,
) -> dict:
    """One configuration, in this process (the ``dfq`` on sys.path is the one measured)."""
    import torch

    from dfq.pipeline import Pipeline, resolve_device
    from dfq.quant import set_calibration
    from dfq.spec import JobSpec

    if threads:
        torch.set_num_threads(threads)
    model, num_classes, input_shape = _teacher(teacher)
    data = {
        "method": method,
        "bits": bits,
        "device": device,
        # one warm-up epoch of one iteration: every later iteration steps both G and S
        "budget": {
            "preset": "cpu",
            "batch_size": batch,
            "warmup_epochs": 1,
            "iters_per_epoch": 1,
            "epochs": 1000,
        },
    }
    if speed:  # only trees that have the speed block get it (the "before" tree does not)
        data["speed"] = speed
    spec = JobSpec.model_validate(data)
    dev = resolve_device(device)
    try:
        pipe = Pipeline(spec, model, num_classes, input_shape, dev)
        pipe.step = 1  # past the one-iteration warm-up epoch
        set_calibration(pipe.student, True)
        if compile:
            # ActQuant's update count is a Python int (no device sync); as a static int it would recompile
            # the student at every calibrating step
            torch._dynamo.config.allow_unspec_int_on_nn_module = True
        for name in compile or []:  # in place: the pipeline keeps its modules, their calls go compiled
            getattr(pipe, name).compile()
        tw = time.perf_counter()
        for _ in range(max(warmup, 1)):
            pipe.train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - tw  # what compiling costs shows here
    except torch.OutOfMemoryError as e:  # "the largest teacher that fits" needs the ones that do not
        return {"teacher": teacher, "method": method, "bits": bits, "batch": batch, "oom": str(e)[:300]}
    if dev.type == "cuda":  # synchronised after the warm-up above
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        pipe.train_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "teacher": teacher,
        "method": method,
        "bits": bits,
        "batch": batch,
        "iters": iters,
        "warmup_s": warmup_s,
        "compile": compile or [],
        "s_per_it": dt / iters,
        "cpu_s_per_it": dc / iters,
        "it_per_s": iters / dt,
        "img_per_s": iters * batch / dt,
        "peak_mem_mb": (torch.cuda.max_memory_allocated() / 2**20)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mem_kind": "cuda max_allocated" if dev.type == "cuda" else "process peak RSS",
        "device": "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "speed": spec.model_dump().get("speed"),
    }
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof_ctx

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with prof_ctx(activities=acts, record_shapes=True) as prof:
            for _ in range(min(iters, 2)):
                pipe.train_step()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        # by op, then by op and input shapes (which conv of which network the time goes to)
        tables = [
            prof.key_averages().table(sort_by=key, row_limit=30),
            prof.key_averages(group_by_input_shape=True).table(
                sort_by=key, row_limit=30, max_name_column_width=30, max_shapes_column_width=120
            ),
        ]
        Path(profile).write_text("\n".join(tables) + "\n")
    return out


def _teacher(name: str) -> tuple:
    """A bundled teacher by name, or ``ARCH@CxHxW[/CLASSES]``: a randomly initialised registry model
    (1000 classes unless given) to measure speed and memory of teachers nobody trained here. Its BN
    statistics are the init's (0, 1); the loop's cost does not depend on them."""
    if "@" not in name:
        from dfq.models.teachers import load_bundled

        model, info = load_bundled(name)
        return model, info.num_classes, info.input_shape
    from dfq.models.registry import build_model

    arch, _, rest = name.partition("@")
    shape, _, classes = rest.partition("/")
    c, h, w = (int(v) for v in shape.lower().split("x"))
    k = int(classes) if classes else 1000
    model = build_model(arch, k, c)
    _settle_bn(model, (c, h, w))
    return model, k, (c, h, w)


def _settle_bn(model, shape: tuple[int, int, int], batches: int = 2, n: int = 8) -> None:
    """BN running statistics measured on Gaussian inputs, as a trained teacher's describe its data.

    With the init's (0, 1) every eval-mode BN is the identity, so a deep random ResNet's activations grow
    block after block; at 3x224x224 the W4A4 student's loss was NaN by its second step (resnet50, on the
    H200 and on this CPU) and the row measured nothing. Settled statistics keep the scale of a trained one."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(n, *shape))
    model.eval()


def run_one(root: Path, cfg: dict) -> dict:
    """Run ``measure`` in a fresh process importing ``dfq`` from ``root``."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg), "--root", str(root)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg['teacher']} {cfg['method']} {cfg['bits']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def failure(row: dict) -> str | None:
    """Why a configuration has no timings ('out of memory', 'failed'), or None when it measured."""
    return "out of memory" if row.get("oom") else "failed" if row.get("error") else None


def markdown(rows: list[dict]) -> str:
    lines = [
        "| tree | teacher | method | bits | batch | iters | s/it | CPU s/it | it/s | img/s | peak RSS MB | threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if failure(r):
            lines.append(
                f"| {r['tree']} | {r['teacher']} | {r['method']} | {r['bits']} | {r['batch']} | "
                f"{failure(r)} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['tree']} | {r['teacher']} | {r['method']} | {r['bits']} | {r['batch']} | {r['iters']} | "
            f"{r['s_per_it']:.3f} | {r['cpu_s_per_it']:.3f} | {r['it_per_s']:.3f} | {r['img_per_s']:.1f} | "
            f"{r['peak_mem_mb']:.0f} | {r['threads']} |"
        )
    return "\n".join(lines) + "\n"


NOTE = (
    "CPU, batch 128, 2 torch threads, on a 2-core machine shared with other jobs (contended): before and "
    "after ran interleaved, configuration by configuration, so drifts hit both; quote the ratios. "
    "CPU s/it (process CPU time) is less inflated by contention than wall s/it.\n\n"
)


def split(results_dir: Path, stems: list[str]) -> None:
    """speed-before (tree 'base') and speed-after (tree 'this') from interleaved runs, plus the ratios."""
    runs = [json.loads((results_dir / f"{stem}.json").read_text()) for stem in stems]
    rows = [r for run in runs for r in run["rows"]]
    metas = [run["meta"] for run in runs]
    for name, tree in (("speed-before", "base"), ("speed-after", "this")):
        mine = [r for r in rows if r["tree"] == tree]
        (results_dir / f"{name}.json").write_text(json.dumps({"meta": metas, "rows": mine}, indent=2) + "\n")
        (results_dir / f"{name}.md").write_text(NOTE + markdown(mine))
    key = ("teacher", "method", "bits")
    lines = [
        "| teacher | method | bits | before s/it | after s/it | speed-up (wall) | before CPU s/it | after CPU s/it | "
        "speed-up (CPU) | before RSS MB | after RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:  # pairs only within one interleaved run
        ok = [r for r in run["rows"] if not failure(r)]
        base = {tuple(r[k] for k in key): r for r in ok if r["tree"] == "base"}
        for r in ok:
            b = base.get(tuple(r[k] for k in key))
            if r["tree"] != "this" or b is None:
                continue
            lines.append(
                f"| {r['teacher']} | {r['method']} | {r['bits']} | {b['s_per_it']:.2f} | {r['s_per_it']:.2f} | "
                f"{b['s_per_it'] / r['s_per_it']:.2f}x | {b['cpu_s_per_it']:.2f} | {r['cpu_s_per_it']:.2f} | "
                f"{b['cpu_s_per_it'] / r['cpu_s_per_it']:.2f}x | {b['peak_mem_mb']:.0f} | {r['peak_mem_mb']:.0f} |"
            )
    (results_dir / "speed-compare.md").write_text(NOTE + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", nargs="+", default=TEACHERS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--bits", nargs="+", default=["W4A4", "W3A3"])
    p.add_argument("--batch", type=int, default=None, help="default: 128 on CPU, 256 on CUDA")
    p.add_argument("--iters", type=int, default=5, help="measured iterations per configuration")
    p.add_argument(
        "--big-iters", type=int, default=2, help="measured iterations for the 3x64x64 teachers (slow on CPU)"
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first (at least 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--speed", type=json.loads, default=None, help="JobSpec.speed overrides (JSON)")
    p.add_argument(
        "--vs-root", type=Path, default=None, help="another checkout, run interleaved (tree 'base')"
    )
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table per configuration")
    p.add_argument(
        "--compile",
        nargs="+",
        choices=["teacher", "student", "generator"],
        default=None,
        help="torch.compile these networks in place (a probe; speed.compile is the switch for the student "
        "and generator); warm-up absorbs compiling",
    )
    p.add_argument("--name", default=None, help="results file stem (default speed-<device>)")
    p.add_argument(
        "--split",
        nargs="+",
        metavar="STEM",
        help="merge interleaved results (--vs-root runs) into speed-before/-after.{json,md} and exit",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (JSON) here
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        sys.path.insert(0, str(args.root))
        print(json.dumps(measure(**json.loads(args.one))))
        return 0
    if args.split:
        split(ROOT / "bench" / "results", args.split)
        return 0
    batch = args.batch or (256 if args.device.startswith("cuda") else 128)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"speed-{args.device.replace(':', '')}"
    trees = [("this", ROOT)] + ([("base", args.vs_root.resolve())] if args.vs_root else [])
    meta = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "batch": batch,
        "argv": sys.argv[1:] if argv is None else argv,
        "trees": {t: str(r) for t, r in trees},
    }
    rows: list[dict] = []
    for teacher in args.teachers:
        iters = args.iters if teacher == "resnet20_fmnist" else args.big_iters
        for method in args.methods:
            for bits in args.bits:
                for tree, root in trees:  # interleaved, so contention drifts hit both trees alike
                    prof = results_dir / f"{stem}-profile-{tree}-{teacher}-{method}-{bits}.txt"
                    cfg = {
                        "teacher": teacher,
                        "method": method,
                        "bits": bits,
                        "batch": batch,
                        "iters": iters,
                        "warmup": args.warmup,
                        "device": args.device,
                        "threads": args.threads,
                        "profile": str(prof) if args.profile else None,
                        "speed": args.speed if tree == "this" else None,
                        "compile": args.compile if tree == "this" else None,
                    }
                    try:
                        row = {"tree": tree, **run_one(root, cfg)}
                    except RuntimeError as e:  # one configuration's failure costs its row, not the others'
                        print(e, file=sys.stderr, flush=True)
                        row = {
                            "tree": tree,
                            "teacher": teacher,
                            "method": method,
                            "bits": bits,
                            "batch": batch,
                            "error": str(e)[-1500:],
                        }
                    rows.append(row)
                    write(results_dir, stem, meta, rows)  # after every row: a killed run keeps its rows
                    if failure(row):
                        print(f"{tree:5s} {teacher:20s} {method:5s} {bits:5s} {failure(row)}", flush=True)
                        continue
                    print(
                        f"{tree:5s} {teacher:20s} {method:5s} {bits:5s} {row['s_per_it']:7.3f} s/it "
                        f"{row['cpu_s_per_it']:7.3f} CPU s/it {row['img_per_s']:6.1f} img/s "
                        f"{row['peak_mem_mb']:6.0f} MB",
                        flush=True,
                    )
    print("\n" + markdown(rows))
    return 0


def write(results_dir: Path, stem: str, meta: dict, rows: list[dict]) -> None:
    (results_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (results_dir / f"{stem}.md").write_text(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
