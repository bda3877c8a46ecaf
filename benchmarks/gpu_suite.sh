#!/usr/bin/env bash
# The GPU benchmark suite of issue 21, one command (<= 8 minutes on one H100/H200):
#   pytest -m gpu; SAM ViT-B and SAM2 extraction images/s at 1024 (stock vs fast backend, fp32 vs bf16);
#   the offline train-step ratio with YOLOv8s at 640; online and mixed throughput with the prefetching
#   live teacher; the peak GPU memory of each. Writes OUT/gpu_suite.json and OUT/gpu_suite.md (a
#   BENCHMARKS.md section; --write-benchmarks also replaces that section in BENCHMARKS.md).
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--write-benchmarks]   # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run [--out DIR]              # every step on the CPU at tiny sizes (seconds)
#
# It installs nothing. A bare GPU image lacks segment-anything, sam2 and ultralytics: ../shared/gpu/ carries
# them (its README: copy it to an ignored .gpu/ of the checkout, `bash .gpu/install.sh`,
# `export PYTHONPATH=/tmp/site:$PYTHONPATH`), then run this. Each step has its own time limit; a failed
# or timed-out step is recorded (rc, log) and the suite goes on.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=0; WRITE=0; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --write-benchmarks) WRITE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR] [--write-benchmarks]" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-work_dirs/gpu_suite}
PY=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$OUT/logs"
: > "$OUT/steps.tsv"
SCALE=1  # x each step's time limit
if [ "$DRY" = 1 ]; then
  # tiny sizes on the CPU: the same commands, so the suite cannot rot before a GPU is at hand; the limits
  # are for a GPU's sizes, a shared CPU may need more for the tiny ones
  SCALE=10
  PYTEST=(tests/test_gpu.py)
  SAM=(--device cpu --size 64 --batch 1 --repeats 1 --dtypes float32)
  SAM2=(--device cpu --size 64 --batch 1 --repeats 1 --dtypes float32)
  TRAIN=(--device cpu --img-sizes 64 --batch-size 2 --batches 1 --repeats 1 --warmup 1 --read-repeats 1
         --teacher-input 64 --cache-dir "$OUT/cache" --malloc inherit)
  PREFETCH=(--device cpu --teacher-size 64 --img-size 64 --images 2 --batch 2 --repeats 1 --warmup 0)
else
  PYTEST=(-m gpu tests)
  SAM=(--device cuda --size 1024 --batch 8 --repeats 5 --dtypes float32,bfloat16)
  SAM2=(--device cuda --size 1024 --batch 8 --repeats 5 --dtypes float32,bfloat16)
  TRAIN=(--device cuda --img-sizes 640 --batch-size 16 --batches 4 --repeats 5 --teacher-input 1024
         --cache-dir "$OUT/cache")
  PREFETCH=(--device cuda --teacher-size 1024 --img-size 640 --images 64 --batch 8 --repeats 2)
fi

step() {  # step NAME LIMIT_S COMMAND...: its output in logs/NAME.log, "NAME rc milliseconds" in steps.tsv
  local name=$1 limit=$2; shift 2
  local start end
  start=$(date +%s%N)
  echo "== $name (limit ${limit}s): $*"
  timeout "$((limit * SCALE))" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  end=$(date +%s%N)
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( (end - start) / 1000000 ))" >> "$OUT/steps.tsv"
  tail -n 3 "$OUT/logs/$name.log"
}

step pytest_gpu 120 "$PY" -m pytest -q -p no:cacheprovider "${PYTEST[@]}"
step sam_extraction 75 "$PY" benchmarks/bench_teacher_backend.py --family sam "${SAM[@]}"
step sam2_extraction 75 "$PY" benchmarks/bench_teacher_backend.py --family sam2 "${SAM2[@]}"
step train_step_yolov8s 90 "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" \
  --override model.backbone.config=configs/backbones/yolov8s.yaml
step prefetch_teacher 120 "$PY" benchmarks/bench_prefetch_teacher.py "${PREFETCH[@]}"

REPORT=(--out "$OUT")
[ "$DRY" = 1 ] && REPORT+=(--dry-run)
[ "$WRITE" = 1 ] && REPORT+=(--write-benchmarks BENCHMARKS.md)
"$PY" benchmarks/gpu_suite_report.py "${REPORT[@]}"
