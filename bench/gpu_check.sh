#!/usr/bin/env bash
# The prepared device check, for a session that is lent a GPU (`status`: can_start_another true).
#
# A lent machine gives a session 15 minutes of device time in all, one command at most 10 minutes, and
# it is bare: it has torch (2.11 when last seen) but not pydantic, and no Fashion-MNIST. So the check is
# one command, prepared here and run there once:
#
#   bash bench/gpu_check.sh prep                 # here: wheels into .whl/, the data into .gpu/ (ignored)
#   run(command="bash bench/gpu_check.sh run", carry=[".whl", ".gpu"], timeout_s=570)
#   # then: tar xzf <files_at>/gpu-results.tgz -C /tmp/gpu && read gpu-check.log; record docs/benchmarks.md
#
# Every stage has its own time limit, so a stage that runs long costs its own figures, not the others',
# and all of them fit BUDGET_S (default 540 s, inside the call's 570): a stage is cut to what is left,
# and the results are packed after every stage. The first run (2026-12-04, H200, torch 2.11.0+cu130,
# log in bench/results/gpu-check-dec4.log) failed in every stage on a host tensor in the engine, since
# fixed and covered by tests/dfq/test_device_placement.py.
# QUICK=1 shrinks every stage to seconds on a CPU (DEV=cpu) to check the plumbing before spending
# device time. What comes back under $OUT: gpu-check.log and gpu-results.tgz (bench/results/gpu-*.json
# and .md, and the quality runs' report.json and metrics.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."

prep() {
    local py=.venv/bin/python pkgs=() name
    for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
        pkgs+=("$name==$($py -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    rm -rf .whl && mkdir -p .whl .gpu/fashion-mnist
    # the lent machine's python is 3.12 (KINDS.md); the same versions as this checkout's .venv
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pkgs[@]}" || return 1
    # the test split only: the runs there evaluate, nothing trains on real data (and the tree stays small)
    cp /usr/share/datasets/fashion-mnist/t10k-*.gz .gpu/fashion-mnist/ || return 1
    ls .whl .gpu/fashion-mnist && du -sh .whl .gpu
}

stage() {  # stage LIMIT_S CMD...: one stage under its own limit, cut to what is left of the call's
    local limit=$1 left=$((END - SECONDS - 25))
    shift
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $(date +%T) skipped (${left}s left of the call): $*"
        return
    fi
    echo "== $(date +%T) limit ${limit}s: $*"
    timeout "$limit" "$@"
    local rc=$?
    echo "== $(date +%T) rc $rc$([ $rc = 124 ] && echo ' (stopped at its limit)')"
    pack
}

pack() {  # after every stage, so a call cut short still brings back what finished
    tar czf "$OUT/gpu-results.tgz" bench/results/gpu-* runs/bench/*/report.json runs/bench/*/metrics.jsonl \
        runs/gpu-smoke/*/report.json 2>/dev/null
}

run() {
    OUT=${OUT:-/tmp/gpu-check-out}
    END=$((SECONDS + ${BUDGET_S:-540}))  # the device call's timeout_s less the tar and the transfers
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu-check.log") 2>&1
    export PYTHONUNBUFFERED=1
    local py=${PY:-python3} dev=${DEV:-cuda}
    if ! $py -c "import pydantic" 2>/dev/null; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    [ -d .gpu/fashion-mnist ] && export DFQ_FASHION_MNIST_DIR=$PWD/.gpu/fashion-mnist
    command -v nvidia-smi >/dev/null && nvidia-smi
    $py -c "import torch, dfq.spec; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

    # sizes: the GPU figures the issues ask for; QUICK=1: the same stages in seconds on a CPU
    local r20=resnet20_fmnist big=(resnet18_fmnist mobilenetv2_fmnist) it=30 bit=20 wu=5 b=256 pb=200
    local large=(resnet50@3x224x224 resnet152@3x224x224 wide_resnet50_2@3x224x224) lit=3 qs=110
    if [ "${QUICK:-0}" = 1 ]; then
        it=1 bit=1 wu=1 b=8 pb=8 lit=1 qs=20 large=(resnet50@3x32x32)
    fi
    local sp=(bench/speed.py --device "$dev" --warmup "$wu" --bits W4A4)

    # 0. end to end on the smoke budget (train, evaluate, export): all four methods composed in one job, and
    #    GDFQ under bf16; the first thing to fail if the engine mixes host and device tensors again (each job
    #    took ~90 s on the 2-core CPU here, most of it the export)
    stage 120 bash -c 'for m in dsg+fdda+acq+lrq gdfq-bf16; do
            "$0" -m dfq.cli quantize --teacher resnet20_fmnist --method ${m%-bf16} --bits W4A4 --budget smoke \
                --device "$1" --eval fashion-mnist --out runs/gpu-smoke/$m \
                $([ "$m" = gdfq-bf16 ] && echo --spec {\"speed\":{\"bf16\":true}}) >/dev/null \
                || echo "smoke $m FAILED"
        done
        grep -o "\"q_top1\": [0-9.]*" runs/gpu-smoke/*/report.json' "$py" "$dev"
    # 0b. a whole job with speed.compile (the student and generator torch.compile'd: 1.76x per iteration in
    #     the 2026-12-04 probe, opt-in until a whole GPU job has run with it; on the CPU here the same job
    #     took 3m14s, most of it compiling)
    stage 180 bash -c '"$0" -m dfq.cli quantize --teacher resnet20_fmnist --method gdfq --bits W4A4 --budget smoke \
            --device "$1" --eval fashion-mnist --out runs/gpu-smoke/gdfq-compile --spec {\"speed\":{\"compile\":true}} \
            >/dev/null || echo "smoke gdfq-compile FAILED"
        grep -o "\"q_top1\": [0-9.]*" runs/gpu-smoke/gdfq-compile/report.json' "$py" "$dev"
    # 1. speed at batch 256 (issue 8): every preset on resnet20_fmnist
    stage 100 $py "${sp[@]}" --teachers $r20 --methods gdfq dsg fdda acq lrq --iters $it --batch $b --name gpu-speed-r20
    # 2. the paper budget's batch (200): its wall time is 80,000 of these iterations (too long for a call),
    #    with a profile of where the time goes
    stage 40 $py "${sp[@]}" --teachers $r20 --methods gdfq --iters $((it * 2)) --batch $pb --profile \
        --name gpu-speed-paper-batch
    # 3. gdfq on the 3x64x64 teachers, then bf16
    stage 45 $py "${sp[@]}" --teachers "${big[@]}" --methods gdfq --iters $bit --big-iters $bit --batch $b --name gpu-speed-big
    stage 45 $py "${sp[@]}" --teachers $r20 "${big[0]}" --methods gdfq --iters $it --big-iters $bit --batch $b \
        --speed '{"bf16": true}' --name gpu-speed-bf16
    # 4. the largest teacher that fits: random-init torchvision models at 224x224, 1000 classes, batch 256
    stage 90 $py "${sp[@]}" --teachers "${large[@]}" --methods gdfq --iters $lit --big-iters $lit --batch $b \
        --name gpu-speed-large
    # 5. a larger budget than the CPU's (issue 3), four jobs on the one GPU at once (issue 8): the paper
    #    recipe cut to the epochs that fit ~$qs s at the measured s/it, four jobs sharing the GPU
    local epochs
    epochs=$($py - "$qs" <<'EOF'
import json, sys
from pathlib import Path
rows = [r for r in json.loads(Path("bench/results/gpu-speed-paper-batch.json").read_text())["rows"] if "s_per_it" in r]
if not rows:
    sys.exit("no s/it measured at the paper batch: the quality stage is skipped")
s_it = rows[0]["s_per_it"] * 2  # acq is ~1.2x gdfq; four jobs sharing the H200 cost each ~5% (2026-12-04)
print(max(8, min(400, int(float(sys.argv[1]) / (s_it * 200)))))
EOF
)
    local iters=200 ms
    [ "${QUICK:-0}" = 1 ] && iters=2
    echo "quality stage: ${epochs:-?} epochs x $iters iterations"
    if [ -n "$epochs" ]; then
        # the lr decays fall in the student's epochs, after the 4 warm-up ones (epochs/2 and 3/4 put both
        # inside the warm-up at 6 epochs on 2026-12-04: the students trained at lr 1e-6)
        ms=$(( 4 + (epochs - 4) / 2 )),$(( 4 + (epochs - 4) * 3 / 4 ))
        stage $((qs + 90)) $py bench/quality.py --budget paper --teachers $r20 --bits W4A4 W3A3 --methods gdfq acq \
            --seeds 0 --parallel 4 --threads 2 --name gpu-quality-r20 --extra "{\"budget\": {\"preset\": \"paper\", \"epochs\": $epochs, \
\"iters_per_epoch\": $iters, \"batch_size\": $pb, \"lr_milestones\": [$ms], \"eval_every\": 0}, \"export\": {\"latency\": false}}"
    fi
    # 6. on what is left: speed.compile at the paper batch (the student and generator; COMPILE="teacher ..."
    #    probes other modules with bench/speed.py --compile instead)
    local how=(--speed '{"compile": true}')
    [ -n "${COMPILE:-}" ] && read -ra how <<< "--compile $COMPILE"
    stage 150 $py "${sp[@]}" --teachers $r20 --methods gdfq --iters $((it * 2)) --batch $pb "${how[@]}" \
        --name gpu-speed-compile
    $py - <<'EOF'
import json
from pathlib import Path
p = Path("bench/results/gpu-speed-paper-batch.json")
rows = [r for r in json.loads(p.read_text())["rows"] if "s_per_it" in r] if p.exists() else []
for r in rows[:1]:
    print(f"paper budget estimate: {r['s_per_it']:.4f} s/it x 80,000 = {r['s_per_it'] * 80000 / 60:.1f} min "
          f"on {r['device']} (resnet20_fmnist gdfq W4A4, batch {r['batch']}; evaluation not included)")
EOF
    pack
    ls -la "$OUT"
}

case "${1:-}" in
prep) prep ;;
run) run ;;
*) echo "usage: bash bench/gpu_check.sh prep|run (see the header)" >&2; exit 2 ;;
esac
