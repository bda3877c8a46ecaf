#!/usr/bin/env bash
# The main job on the shipped coco128, CPU-sized: cache SAM ViT-B features -> train a YOLOv8n
# student with feature distillation -> evaluate mAP on val2017. About 5 minutes on 2 cores.
# Knobs (environment): EPOCHS (3), TEACHER_INPUT (384), IMG_SIZE (320), BATCH (16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# glibc returns SAM's large activation buffers to the OS after every block; keeping them mapped
# cuts the teacher pass's system time ~4x on CPU (results are unchanged).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-17179869184} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-17179869184}
EPOCHS=${EPOCHS:-3}
TEACHER_INPUT=${TEACHER_INPUT:-384}
IMG_SIZE=${IMG_SIZE:-320}
BATCH=${BATCH:-16}
CKPT=weights/sam_vit_b_01ec64.pth
FEATURES=teacher_features/sam_vit_b_${TEACHER_INPUT}
EXPERIMENT=configs/experiments/yolov8_sam_coco128.yaml

if [ -f "$CKPT" ]; then
  INIT=pretrained
else
  INIT=random
  FEATURES=${FEATURES}_random
  cat <<BANNER
################################################################################
##  No SAM checkpoint at $CKPT (get it with: python tools/download_weights.py --model sam_vit_b).
##  This run takes the EXPLICIT random-init path (teacher.init=random): the pipeline runs end
##  to end, but the teacher's features carry no knowledge and the mAP means nothing.
################################################################################
BANNER
fi

set -x
"$PY" tools/prepare_teacher_features.py --teacher sam --dataset coco128 --output "$FEATURES" \
  teacher.input_size="$TEACHER_INPUT" teacher.init="$INIT" teacher.checkpoint="$CKPT"
"$PY" tools/train.py --config "$EXPERIMENT" --no-progress \
  teachers.sam.input_size="$TEACHER_INPUT" teachers.sam.init="$INIT" teachers.sam.feature_path="$FEATURES" \
  train.epochs="$EPOCHS" data.img_size="$IMG_SIZE" data.batch_size="$BATCH" train.lr=0.002 train.warmup_iters=8
RUN=$(ls -td work_dirs/yolov8_sam_coco128/*/ | head -n 1)
"$PY" tools/test.py --config "$RUN/config.yaml" --checkpoint "$RUN/checkpoints/best.pt" --no-progress
set +x
echo "main job done: run directory $RUN (config.yaml, train.log, metrics.json, checkpoints/, TensorBoard events)"
