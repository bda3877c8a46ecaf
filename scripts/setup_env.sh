#!/usr/bin/env bash
# The design's environment step: install vfmkd and its pinned dependencies (scripts/setup.sh), then
# report what this machine has and the next command to run.
#   bash scripts/setup_env.sh           # install (or confirm) the environment, then report
#   bash scripts/setup_env.sh --check   # report only, install nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
  "") bash scripts/setup.sh ;;
  --check) ;;
  -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "setup_env.sh: unknown argument '$1' (use --check to report without installing, or no argument)" >&2; exit 2 ;;
esac
"$PY" - <<'PY'
import os
import sys
from pathlib import Path

try:
    import torch
    from vfmkd.core.official_weights import OFFICIAL_WEIGHTS
except ImportError as exc:
    sys.exit(f"vfmkd is not installed in {sys.executable} ({exc}); run: bash scripts/setup_env.sh")

cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU training; GPU tests skip)"
images = {s: len(list(Path("datasets/coco128/images", s).glob("*.jpg"))) for s in ("train2017", "val2017")}
present = [w.filename for w in OFFICIAL_WEIGHTS.values() if Path("weights", w.filename).is_file()]
print(f"python   {sys.version.split()[0]} ({sys.executable})")
print(f"torch    {torch.__version__}; GPU: {gpu}; CPU cores: {cores} (data.num_workers above this is clamped)")
print(f"coco128  datasets/coco128: {images['train2017']} train2017 + {images['val2017']} val2017 images (built in)")
print(f"weights  weights/: {', '.join(present) if present else 'none'}")
if not all(images.values()):
    print("next     datasets/coco128 is incomplete: restore it from the repository (git checkout datasets/coco128)")
elif OFFICIAL_WEIGHTS["sam_vit_b"].filename in present:
    print("next     bash scripts/run_main_job.sh")
else:
    print("next     python tools/download_sam_weights.py --model vit_b   (offline it prints the URL and sha256 to "
          "fetch elsewhere), or run without weights: bash scripts/run_main_job.sh takes the teacher.init=random path")
PY
