#!/usr/bin/env bash
# The prepared run for a lent GPU (one call, at most about 8 minutes): per-iteration speed of the
# reconstruction loops (issue 5), the paper-budget ResNet-20 runs (issue 4) with their wall time
# and peak memory, and the peak GPU memory of a 1,024-image ResNet-50 run with a 4 GiB cache
# budget (issue 5). Each part has its own time limit, so a slow part cannot take the others'
# results with it. Writes logs and JSON to $OUT (default /tmp/brecq_gpu).
#
#   bash benchmarks/gpu_session.sh             # on the GPU machine, from the repository root
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_session.sh   # a quick dry run of the same steps
#   PARTS=resnet18 bash benchmarks/gpu_session.sh       # only the timed ResNet-18 W2A4 full run
#
# PARTS (default "speed paper memory") picks among: speed, paper, memory (beside paper W2A4),
# resnet18 (a whole ResNet-18 W2A4 run at 224x224, 20,000/5,000 iterations per unit, about
# 5 minutes on an H200 by the per-iteration figures), tune (held-out tuning at the CPU budget,
# then val, with ResNet-56 QDrop cells beside it; TUNE_S seconds, default 420).
#
# Data: $BRECQ_DATA_ROOT, default ../shared as on the development machines (benchmarks/common.py);
# where it is absent and .gpu_carry/shared.tar.gz exists, it is unpacked there. Make that packed
# copy beforehand with
#   mkdir -p .gpu_carry && tar -C ../shared -czf .gpu_carry/shared.tar.gz data/cifar10 \
#       weights/cifar10/resnet20.pt weights/cifar10/resnet56.pt
# (about 11 MB; .gpu_carry is git-ignored locally, so pass it to the device tool's carry list).
# Keep what a part leaves under $OUT to a few files: the device returns a limited number.
set -u
OUT=${OUT:-/tmp/brecq_gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export BRECQ_DATA_ROOT=${BRECQ_DATA_ROOT:-$(dirname "$PWD")/shared}
PY=${PY:-python3}
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started )) s] $*"; }

if [ ! -d "$BRECQ_DATA_ROOT/data/cifar10" ] && [ -f .gpu_carry/shared.tar.gz ]; then
    mkdir -p "$BRECQ_DATA_ROOT" && tar -C "$BRECQ_DATA_ROOT" -xzf .gpu_carry/shared.tar.gz
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

if [ "${SMALL:-0}" = 1 ]; then
    SPEED_ARGS="--iters 5 --repeats 1 --resnet18-iters 2"; PAPER_ARGS="--iters-w 20 --iters-a 10 --eval-size 500"
    R50="2,1"; R18="2,1"; R50_CALIB=16; TUNE_ARGS="--iters-w 4 --iters-a 2 --eval-size 200"
else
    SPEED_ARGS="--iters 250 --repeats 3"; PAPER_ARGS=""; R50="20,10"; R18="20000,5000"; R50_CALIB=1024
    TUNE_ARGS=""
fi

PARTS=" ${PARTS:-speed paper memory} "
has() { [[ "$PARTS" == *" $1 "* ]]; }

if has speed; then
elapsed "1. per-iteration speed"
timeout 120 $PY benchmarks/speed.py --device "$DEVICE" \
    --variants eager,fast,fast+graph,fast+graph+bf16 $SPEED_ARGS \
    --pipeline-iters skip --skip resnet50-cache --out "$OUT/speed_gpu.json" 2>&1 \
    | grep -v "it/s\]" | tee "$OUT/speed_gpu.log"
fi

if has paper; then
elapsed "2. paper budget ResNet-20 BRECQ W4A4 (alone: its wall time is the full-run figure)"
timeout 200 $PY benchmarks/accuracy.py --models resnet20 --methods brecq-block --bits W4A4 \
    --seeds 0 --budget paper --device "$DEVICE" $PAPER_ARGS --name accuracy_paper_gpu \
    --results-dir "$OUT" --no-report > "$OUT/paper_W4A4.log" 2>&1
tail -n 4 "$OUT/paper_W4A4.log"
fi

if has paper; then
elapsed "3. paper budget W2A4"
timeout 180 $PY benchmarks/accuracy.py --models resnet20 --methods brecq-block --bits W2A4 \
    --seeds 0 --budget paper --device "$DEVICE" $PAPER_ARGS --name accuracy_paper_gpu \
    --results-dir "$OUT" --no-report > "$OUT/paper_W2A4.log" 2>&1 &
fi
if has memory; then
elapsed "3b. ResNet-50 W4A4 peak memory, 1,024 images, 4 GiB cache budget"
timeout 180 $PY benchmarks/speed.py --device "$DEVICE" --skip resnet20,resnet18,resnet50-cache \
    --pipeline-iters skip --whole-run "resnet50:W4A4:$R50" --calib-size "$R50_CALIB" \
    --cache-budget-gb 4 --out "$OUT/resnet50_memory.json" > "$OUT/resnet50_memory.log" 2>&1
grep -A1 "resnet50 W4A4" "$OUT/resnet50_memory.log" || tail -n 5 "$OUT/resnet50_memory.log"
fi
wait
if has paper; then tail -n 4 "$OUT/paper_W2A4.log"; cat "$OUT"/accuracy_paper_gpu.jsonl; fi

if has resnet18; then
elapsed "4. whole ResNet-18 W2A4 run at 224x224 (random weights), 20,000/5,000 iterations"
timeout "${R18_TIMEOUT:-560}" $PY benchmarks/speed.py --device "$DEVICE" --skip resnet20,resnet18,resnet50-cache \
    --pipeline-iters skip --whole-run "resnet18:W2A4:$R18" --calib-size "$R50_CALIB" \
    --out "$OUT/resnet18_run.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/resnet18_run.log"
fi
if has tune; then
# Issue 4 at the CPU budget (2,000 / 500 iterations per unit; the GPU only makes it quicker):
# settings chosen on held-out train images, then val (benchmarks/tune.py), and ResNet-56 QDrop
# cells beside it. TUNE_S bounds the whole part.
TUNE_S=${TUNE_S:-420}
elapsed "5. CPU-budget tuning on held-out train images, then val (at most $TUNE_S s)"
timeout "$TUNE_S" $PY benchmarks/accuracy.py --models resnet56 --methods qdrop --bits W4A4,W2A4 \
    --seeds 0 --budget cpu --device "$DEVICE" $PAPER_ARGS --name accuracy_cpu_budget_gpu \
    --results-dir "$OUT" --no-report > "$OUT/resnet56.log" 2>&1 &
timeout "$TUNE_S" $PY benchmarks/tune.py --spec "${TUNE_SPEC:-benchmarks/tune_spec.json}" \
    --device "$DEVICE" --jobs "${TUNE_JOBS:-8}" --deadline-s $((TUNE_S - 15)) \
    --val-reserve-s "${VAL_RESERVE_S:-110}" --run-s "${RUN_S:-60}" $TUNE_ARGS --out "$OUT/tune" 2>&1 | tee "$OUT/tune.log"
wait
grep RESULT "$OUT/resnet56.log"
fi
elapsed "done"
