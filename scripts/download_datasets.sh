#!/usr/bin/env bash
# Datasets for vfmkd, in the layout its loader reads (the same as the shipped coco128):
#   <root>/images/<split>/*.jpg
#   <root>/object_detection/labels/<split>/<image>.txt    YOLO boxes "class cx cy w h", normalised, classes 0-79
#   <root>/object_detection/config.yaml                   class names
#
#   bash scripts/download_datasets.sh                     # what is available; coco128 is built in
#   bash scripts/download_datasets.sh coco2017 [--dir DIR]  # full COCO 2017 train/val (~19 GiB) into datasets/coco2017
#
# coco2017: the official zips from images.cocodataset.org go to <root>/downloads/; downloads resume
# (curl -C - / wget -c), each zip is checked against its md5 before it is unpacked, and the
# instances_<split>.json boxes are converted to YOLO labels. Rerunning skips every finished step.
# Offline: it prints each zip's URL and md5 and where to put it, and exits 2; copy the zips
# there and run the same command again (verified zips are not downloaded again).
# Then: python tools/train.py CONFIG --dataset coco2017   (or data.dataset=coco2017 data.root=datasets/coco2017)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
COCO_URL=${COCO_URL:-http://images.cocodataset.org}  # a mirror with the same paths may be set here

# name  path under COCO_URL  md5 (the values every public COCO downloader pins: PaddleDetection,
# GluonCV-style manifests, ...; images.cocodataset.org itself publishes none)
COCO2017_FILES=(
  "annotations_trainval2017.zip annotations/annotations_trainval2017.zip f4bbac642086de4f52a3fdda2de5fa2c"
  "val2017.zip zips/val2017.zip 442b8da7639aecaf257c1dceb8ba8c80"
  "train2017.zip zips/train2017.zip cced6f7f71b7629ddf16f17bbcfab6b2"
)

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

say_coco128() {
  local n_train n_val
  n_train=$(find datasets/coco128/images/train2017 -name '*.jpg' 2>/dev/null | wc -l)
  n_val=$(find datasets/coco128/images/val2017 -name '*.jpg' 2>/dev/null | wc -l)
  echo "coco128 is built in: datasets/coco128 ($n_train train2017 + $n_val val2017 images, YOLO labels); nothing to download."
  echo "Every shipped experiment uses it (data.dataset: coco128)."
  echo "Full COCO 2017 (~19 GiB, needs the internet): bash scripts/download_datasets.sh coco2017 [--dir DIR]"
}

md5_ok() { [ -f "$1" ] && [ "$(md5sum "$1" | cut -d' ' -f1)" = "$2" ]; }

fetch() {  # fetch URL FILE: resumable download into FILE
  if command -v curl >/dev/null; then
    curl -fL --retry 3 -C - -o "$2" "$1"
  else
    wget -c -O "$2" "$1"
  fi
}

reachable() {
  if command -v curl >/dev/null; then
    curl -fsSI -m 20 -o /dev/null "$1" 2>/dev/null
  else
    wget -q --spider -T 20 "$1" 2>/dev/null
  fi
}

offline_instructions() {  # offline_instructions DOWNLOADS
  echo "error: cannot reach $COCO_URL from this machine (no network?). Nothing was downloaded." >&2
  echo "Next step: fetch these files on a machine with internet, check their md5, copy them into $1/," >&2
  echo "and run this command again (it verifies them, unpacks them and writes the YOLO labels):" >&2
  local entry name path md5
  for entry in "${COCO2017_FILES[@]}"; do
    read -r name path md5 <<<"$entry"
    md5_ok "$1/$name" "$md5" && continue
    echo "  $COCO_URL/$path" >&2
    echo "      md5 $md5 -> $1/$name" >&2
  done
  echo "Meanwhile coco128 (built in, datasets/coco128) runs everything offline." >&2
}

download_coco2017() {  # download_coco2017 ROOT
  local root=$1 downloads=$1/downloads entry name path md5 missing=0
  mkdir -p "$downloads"
  for entry in "${COCO2017_FILES[@]}"; do
    read -r name path md5 <<<"$entry"
    md5_ok "$downloads/$name" "$md5" || missing=1
  done
  read -r name path md5 <<<"${COCO2017_FILES[0]}"
  if [ "$missing" = 1 ] && ! reachable "$COCO_URL/$path"; then
    offline_instructions "$downloads"
    exit 2
  fi
  for entry in "${COCO2017_FILES[@]}"; do
    read -r name path md5 <<<"$entry"
    if md5_ok "$downloads/$name" "$md5"; then
      echo "$name: present, md5 verified"
      continue
    fi
    if [ -f "$downloads/$name" ]; then  # a finished file that fails its md5: fetch it again
      echo "$name: md5 does not match $md5; downloading it again"
      rm -f "$downloads/$name"
    fi
    echo "$name: downloading $COCO_URL/$path (resumable: rerun after an interruption)"
    if ! fetch "$COCO_URL/$path" "$downloads/$name.part"; then
      echo "error: the download of $name stopped; run this command again to resume it." >&2
      exit 2
    fi
    if ! md5_ok "$downloads/$name.part" "$md5"; then
      rm -f "$downloads/$name.part"
      echo "error: $name does not match its md5 $md5 (corrupt or altered); it was deleted. Run this command again." >&2
      exit 2
    fi
    mv "$downloads/$name.part" "$downloads/$name"
    echo "$name: md5 verified"
  done
  local split
  for split in val2017 train2017; do
    if [ ! -f "$root/images/$split/.complete" ]; then
      echo "unpacking $split.zip -> $root/images/$split/"
      mkdir -p "$root/images"
      unzip -q -o "$downloads/$split.zip" -d "$root/images"
      touch "$root/images/$split/.complete"
    fi
  done
  if [ ! -f "$root/annotations/instances_train2017.json" ] || [ ! -f "$root/annotations/instances_val2017.json" ]; then
    unzip -q -o "$downloads/annotations_trainval2017.zip" 'annotations/instances_*2017.json' -d "$root"
  fi
  "$PY" - "$root" <<'PY'
"""COCO instances JSON -> YOLO txt (class cx cy w h, normalised; crowd boxes left out), classes in
the contiguous COCO-80 order (sorted category ids), names in object_detection/config.yaml."""
import json
import sys
from collections import defaultdict
from pathlib import Path

root = Path(sys.argv[1])
det = root / "object_detection"
for split in ("train2017", "val2017"):
    out = det / "labels" / split
    done = out.parent / f".{split}.complete"
    if done.is_file():
        print(f"{split}: YOLO labels already written")
        continue
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    cats = sorted(c["id"] for c in coco["categories"])
    cls = {cid: i for i, cid in enumerate(cats)}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {im["id"]: im for im in coco["images"]}
    lines = defaultdict(list)
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        if a.get("iscrowd", 0) or w <= 0 or h <= 0:
            continue
        W, H = im["width"], im["height"]
        lines[im["file_name"]].append(f"{cls[a['category_id']]} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}")
    out.mkdir(parents=True, exist_ok=True)
    for im in images.values():  # an image without boxes gets an empty file (a negative)
        (out / (Path(im["file_name"]).stem + ".txt")).write_text("".join(l + "\n" for l in lines[im["file_name"]]))
    names_yaml = "".join(f"  {i}: {names[cid]}\n" for i, cid in enumerate(cats))
    (det / "config.yaml").write_text(f"# COCO 2017 YOLO format config file\npath: .\ntrain: images/train2017\n"
                                     f"val: images/val2017\n\nnames:\n{names_yaml}")
    done.touch()
    print(f"{split}: {len(images)} label files, {sum(map(len, lines.values()))} boxes -> {out}")
PY
  echo "COCO 2017 is ready in $root. Train on it: python tools/train.py CONFIG --dataset coco2017"
}

dataset=""
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dir) [ $# -ge 2 ] || { echo "error: --dir needs a folder" >&2; exit 2; }; dir=$2; shift 2 ;;
    -*) echo "error: unknown option '$1'; see --help" >&2; exit 2 ;;
    *) [ -z "$dataset" ] || { echo "error: one dataset at a time (got '$dataset' and '$1')" >&2; exit 2; }; dataset=$1; shift ;;
  esac
done
case "${dataset:-coco128}" in
  coco128) say_coco128 ;;
  coco2017|coco) download_coco2017 "${dir:-datasets/coco2017}" ;;
  *) echo "error: unknown dataset '$dataset': coco128 (built in) or coco2017 (downloaded); see --help" >&2; exit 2 ;;
esac
