"""YOLO-format detection dataset (coco128 layout) with optional cached teacher features.

Layout: ``root/images/<split>/*.jpg`` and ``root/object_detection/labels/<split>/<stem>.txt`` with
one ``class cx cy w h`` line per box (normalised to 0..1). Images are letterboxed the YOLO way and
the letterbox is recorded as the same per-axis affine the teachers use (see
:class:`vfmkd.teachers.base.TeacherBatch`), so teacher and student cells can be matched.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from vfmkd.core.config import resolve_path
from vfmkd.core.errors import CacheMismatchError, DatasetError
from vfmkd.datasets.feature_cache import FeatureCacheReader, cache_file, dataset_cli_args, rebuild_command

LOGGER = logging.getLogger("vfmkd")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PAD_VALUE = 114


def list_images(root: str | Path, split: str, limit: Optional[int] = None) -> List[Path]:
    """Image files of ``root/images/<split>`` sorted by name; ``limit`` keeps the first N."""
    folder = Path(root) / "images" / split
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder} (expected <root>/images/<split>/*.jpg)")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=lambda p: p.name)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems: Dict[str, Path] = {}
    for p in files:  # the stem is the image id (labels, caches): it must be unique
        if p.stem in stems:
            raise DatasetError(f"two images share the id '{p.stem}': {stems[p.stem].name} and {p.name}; rename one")
        stems[p.stem] = p
    return files[:limit] if limit is not None else files


def probe_image(path: Path) -> Tuple[int, int]:
    """Decode ``path`` cheaply and return its (h, w); raises if it cannot be decoded.

    JPEGs are decoded at 1/8 scale (``Image.draft``): the DCT is skipped but the whole entropy
    stream is still read, so a truncated file fails (``LOAD_TRUNCATED_IMAGES`` stays False).
    """
    with Image.open(path) as im:
        w, h = im.size
        if im.format == "JPEG":
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()
    return h, w


def check_images(paths: Sequence[Path], split: str) -> Tuple[List[Path], List[Tuple[int, int]], List[Tuple[str, str]]]:
    """Split ``paths`` into decodable ones (with their (h, w)) and skipped (path, reason); logs one line."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned it on: truncated files would pass as grey
        LOGGER.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images cannot be detected")
    ok, sizes, skipped = [], [], []
    for p in paths:
        try:
            sizes.append(probe_image(p))
            ok.append(p)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            skipped.append((str(p), f"{type(exc).__name__}: {exc}"))
    if skipped:
        names = "; ".join(f"{p} ({why})" for p, why in skipped)
        LOGGER.warning(f"skipped {len(skipped)} of {len(paths)} images in {split} that cannot be decoded: {names}")
    return ok, sizes, skipped


def load_rgb(path: str | Path) -> np.ndarray:
    """Full decode to an RGB uint8 (H, W, 3) array; the one decoder for students and teachers."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def letterbox(img: np.ndarray, size: int) -> Tuple[np.ndarray, Tuple[float, float, float, float]]:
    """YOLO letterbox of an (H, W, 3) image to (size, size, 3), as ultralytics' ``LetterBox``
    (scale-up allowed, centred padding of 114). Returns the canvas and the affine (sx, sy, ox, oy):
    original pixel (x, y) -> canvas pixel (x * sx + ox, y * sy + oy)."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, (new_w / w, new_h / h, float(left), float(top))


def parse_labels(path: Path, num_classes: int) -> np.ndarray:
    """(n, 5) float32 rows ``class cx cy w h`` of a YOLO label file; a missing file means no objects."""
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        if len(parts) != 5:
            raise DatasetError(f"{where}: expected 'class cx cy w h' (5 values), got {len(parts)}: {line.strip()!r}")
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DatasetError(f"{where}: non-numeric value in {line.strip()!r}") from None
        if not all(np.isfinite(values)):
            raise DatasetError(f"{where}: non-finite value in {line.strip()!r}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise DatasetError(
                f"{where}: class id {parts[0]} is outside [0, {num_classes}) (num_classes={num_classes}). "
                f"Fix the label, or set model.heads.detection.num_classes to the dataset's class count."
            )
        cx, cy, bw, bh = values[1:]
        if min(cx, cy, bw, bh) < 0 or max(cx, cy, bw, bh) > 1:
            raise DatasetError(f"{where}: box {cx} {cy} {bw} {bh} is not normalised to [0, 1] (YOLO cx cy w h)")
        rows.append(values)
    return np.asarray(rows, np.float32).reshape(-1, 5)


class DetectionDataset(Dataset):
    """Letterboxed images, YOLO boxes and (optionally) cached teacher features of one split.

    ``teacher_caches`` maps a teacher name to its cache: a ``<split>.h5`` file or the folder that
    holds it (``teacher_features/sam/``). Unreadable images are skipped (``self.skipped``).
    """

    def __init__(
        self,
        root: str,
        split: str,
        img_size: int = 640,
        limit: Optional[int] = None,
        num_classes: int = 80,
        teacher_caches: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.root, self.split, self.img_size, self.num_classes = resolve_path(root), split, int(img_size), num_classes
        self.limit = limit
        listed = list_images(self.root, split, limit)
        self.paths, self.orig_sizes, self.skipped = check_images(listed, split)
        if not self.paths:
            raise DatasetError(f"none of the {len(listed)} images in {self.root / 'images' / split} can be decoded")
        self.image_ids = [p.stem for p in self.paths]
        label_dir = self.root / "object_detection" / "labels" / split
        self.labels = [parse_labels(label_dir / f"{i}.txt", num_classes) for i in self.image_ids]
        self.caches: Dict[str, FeatureCacheReader] = {
            name: self._open_cache(name, path) for name, path in (teacher_caches or {}).items()
        }

    def _open_cache(self, name: str, path: str) -> FeatureCacheReader:
        """Open a teacher cache and check it covers every image of this dataset, at their sizes."""
        file = cache_file(resolve_path(path), self.split)
        dataset, data_root = dataset_cli_args(self.root)
        if not file.is_file():
            cmd = rebuild_command(name, dataset, self.split, str(file.parent), data_root=data_root, limit=self.limit)
            raise CacheMismatchError(f"teacher '{name}': no feature cache at {file}. Fill it with:\n  {cmd}")
        reader = FeatureCacheReader(file)
        missing = reader.missing_ids(self.image_ids)
        if missing:
            cmd = reader.rebuild_command(data_root, limit=self.limit)
            head = (f"teacher '{name}': {len(missing)} of {len(self.image_ids)} images of {self.split} are missing from "
                    f"{file} (e.g. {', '.join(missing[:3])}).")
            if reader.image_ids == self.image_ids:  # same list, unfinished: the tool resumes it
                raise CacheMismatchError(f"{head} Finish the cache with:\n  {cmd}")
            raise CacheMismatchError(
                f"{head} It was built for another image list ({len(reader.image_ids)} images, e.g. another --limit): "
                f"delete {file} (or pick another --output) and run:\n  {cmd}"
            )
        for image_id, hw in zip(self.image_ids, self.orig_sizes):
            cached = tuple(int(v) for v in reader.orig_hw[reader.index_of(image_id)])
            if cached != tuple(hw):
                raise CacheMismatchError(
                    f"teacher '{name}': image {image_id} is {hw[0]}x{hw[1]} but {file} cached it at "
                    f"{cached[0]}x{cached[1]}; the image changed. Delete {file} and rebuild:\n  {reader.rebuild_command(data_root, limit=self.limit)}"
                )
        return reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        img = load_rgb(self.paths[index])
        h, w = img.shape[:2]
        canvas, (sx, sy, ox, oy) = letterbox(img, self.img_size)
        labels = self.labels[index]
        s = float(self.img_size)
        # normalised original xywh -> normalised letterboxed xywh (same affine as the pixels)
        boxes = np.stack(
            (
                (labels[:, 1] * w * sx + ox) / s,
                (labels[:, 2] * h * sy + oy) / s,
                labels[:, 3] * w * sx / s,
                labels[:, 4] * h * sy / s,
            ),
            axis=1,
        ).astype(np.float32)
        sample: Dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))).float().div_(255.0),
            "cls": torch.from_numpy(labels[:, 0].copy()),
            "bboxes": torch.from_numpy(boxes.reshape(-1, 4)),
            "affine": torch.tensor([sx, sy, ox, oy], dtype=torch.float32),
            "orig_hw": torch.tensor([h, w], dtype=torch.int64),
            "image_id": self.image_ids[index],
        }
        for name, reader in self.caches.items():
            sample[f"teacher/{name}"] = reader.read(self.image_ids[index])
        return sample


def collate_detection(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch samples: ``images`` (B, 3, S, S); ``cls`` (N, 1); ``bboxes`` (N, 4) normalised xywh;
    ``batch_idx`` (N,) float (ultralytics' ``v8DetectionLoss`` batch format); ``affine`` (B, 4);
    ``orig_hw`` (B, 2); ``image_ids``; ``teachers[name]`` = {features {name: (B, C, h, w) fp16},
    affine (B, 4), valid_hw (B, 2), input_size}."""
    cls = [s["cls"] for s in samples]
    batch: Dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "cls": torch.cat(cls).float().view(-1, 1),
        "bboxes": torch.cat([s["bboxes"] for s in samples]).float().view(-1, 4),
        "batch_idx": torch.cat([torch.full((len(c),), float(i)) for i, c in enumerate(cls)]),
        "affine": torch.stack([s["affine"] for s in samples]),
        "orig_hw": torch.stack([s["orig_hw"] for s in samples]),
        "image_ids": [s["image_id"] for s in samples],
        "teachers": {},
    }
    names = [k[len("teacher/"):] for k in samples[0] if k.startswith("teacher/")]
    for name in names:
        entries = [s[f"teacher/{name}"] for s in samples]
        batch["teachers"][name] = {
            "features": {f: torch.stack([e["features"][f] for e in entries]) for f in entries[0]["features"]},
            "affine": torch.stack([e["affine"] for e in entries]),
            "valid_hw": torch.stack([e["valid_hw"] for e in entries]),
            "input_size": int(entries[0]["input_size"]),
        }
    return batch
