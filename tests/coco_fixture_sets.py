"""Small datasets in vfmkd's folder layout built from coco128 images, shared by the fault suites."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "datasets" / "coco128"
SPLIT = "train2017"


def coco_image(k: int = 0) -> Path:
    """The k-th coco128 train2017 image (sorted by name)."""
    return sorted((COCO / "images" / SPLIT).glob("*.jpg"))[k]


def new_root(tmp_path: Path) -> Path:
    """An empty dataset root with the image and box-label folders of ``SPLIT``."""
    root = tmp_path / "ds"
    (root / "images" / SPLIT).mkdir(parents=True)
    (root / "object_detection" / "labels" / SPLIT).mkdir(parents=True)
    return root
