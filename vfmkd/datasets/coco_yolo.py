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

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from vfmkd.core.config import resolve_path
from vfmkd.core.errors import CacheMismatchError, DatasetError
import vfmkd.teachers  # noqa: F401  (registers the built-in teachers: their preprocessing geometry is used)
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets.feature_cache import FeatureCacheReader, cache_file, dataset_cli_args, rebuild_command
from vfmkd.datasets.transforms import GeometricAugment, StudentView, student_view, transform_boxes

LOGGER = logging.getLogger("vfmkd")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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
        augment: Optional[GeometricAugment] = None,
        seed: int = 0,
        allow_missing_features: bool = False,
        offline_max_shift: float = 0.05,
        offline_crops: bool = False,
    ) -> None:
        self.root, self.split, self.img_size, self.num_classes = resolve_path(root), split, int(img_size), num_classes
        self.limit = limit
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed, self.epoch = seed, 0
        listed = list_images(self.root, split, limit)
        self.paths, self.orig_sizes, self.skipped = check_images(listed, split)
        if not self.paths:
            raise DatasetError(f"none of the {len(listed)} images in {self.root / 'images' / split} can be decoded")
        self.image_ids = [p.stem for p in self.paths]
        label_dir = self.root / "object_detection" / "labels" / split
        self.labels = [parse_labels(label_dir / f"{i}.txt", num_classes) for i in self.image_ids]
        # allow_missing_features: images absent from a cache are served as offline_ok=False (the
        # trainer then asks the live teacher) instead of stopping the run.
        self.allow_missing = allow_missing_features
        self.max_shift = float(offline_max_shift)
        self.offline_crops = bool(offline_crops)
        self.missing: Dict[str, set] = {}
        self.caches: Dict[str, FeatureCacheReader] = {
            name: self._open_cache(name, path) for name, path in (teacher_caches or {}).items()
        }
        # The teacher classes know their preprocessing geometry (how a live pass would see a view).
        self.teacher_classes = {name: TEACHERS.get(r.teacher_config.get("type") or name) for name, r in self.caches.items()}

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
            if self.allow_missing:
                LOGGER.warning("%s They go to the live teacher (distillation.missing_cache=online). Complete the cache "
                               "with:\n  %s", head, cmd)
                self.missing[name] = set(missing)
                return reader
            if reader.image_ids == self.image_ids:  # same list, unfinished: the tool resumes it
                raise CacheMismatchError(f"{head} Finish the cache with:\n  {cmd}")
            raise CacheMismatchError(
                f"{head} It was built for another image list ({len(reader.image_ids)} images, e.g. another --limit): "
                f"delete {file} (or pick another --output) and run:\n  {cmd}"
            )
        for image_id, hw in zip(self.image_ids, self.orig_sizes):
            if image_id in self.missing.get(name, ()):
                continue
            cached = tuple(int(v) for v in reader.orig_hw[reader.index_of(image_id)])
            if cached != tuple(hw):
                raise CacheMismatchError(
                    f"teacher '{name}': image {image_id} is {hw[0]}x{hw[1]} but {file} cached it at "
                    f"{cached[0]}x{cached[1]}; the image changed. Delete {file} and rebuild:\n  {reader.rebuild_command(data_root, limit=self.limit)}"
                )
        return reader

    def _offline_block(self, name: str, view: StudentView, entry: Mapping[str, Any], reader: FeatureCacheReader) -> str:
        """'' when the cached map can stand in for a live pass on this view, else why not. ViT maps
        are neither flip- nor scale- nor shift-equivariant and see global context: flips need the
        cached flipped pass, crops go live unless ``offline_crops``, and views that a live teacher
        would see displaced by more than ``offline_max_shift`` of its canvas go live
        (benchmarks/bench_aug_agreement.py measures the agreement)."""
        if view.rotated:
            return "rotated view (no axis-aligned map to the cached grid)"
        if view.flipped and not reader.has_flip:
            return "flipped view and the cache has no flipped pass (--with-flip)"
        if view.cropped and not self.offline_crops:
            return "view crops the image (the cached map saw context this view lacks; offline_crops=false)"
        shift = live_view_shift(view, entry["affine"], int(entry["input_size"]), self.teacher_classes[name])
        if shift > self.max_shift:
            return f"view moved {shift:.0%} of the teacher canvas vs the cached pass (offline_max_shift {self.max_shift})"
        return ""

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index): reproducible with any worker count.
        Call before each epoch (DataLoader workers must not be persistent to see it)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Dict[str, Any]:
        img = load_rgb(self.paths[index])
        h, w = img.shape[:2]
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.augment else None
        view = student_view(img, self.img_size, self.augment, rng)
        boxes = transform_boxes(self.labels[index], w, h, view, self.img_size, drop_small=self.augment is not None)
        # A rotated view has no per-axis affine; the axis-aligned part is kept for shape only and
        # such samples are never matched to cached grids (`offline_ok` is False).
        affine = view.affine or (float(view.matrix[0, 0]), float(view.matrix[1, 1]), float(view.matrix[0, 2]), float(view.matrix[1, 2]))
        sample: Dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(view.canvas.transpose(2, 0, 1))).float().div_(255.0),
            "cls": torch.from_numpy(boxes[:, 0].copy()),
            "bboxes": torch.from_numpy(boxes[:, 1:5].copy()),
            "affine": torch.tensor(affine, dtype=torch.float32),
            "orig_hw": torch.tensor([h, w], dtype=torch.int64),
            "image_id": self.image_ids[index],
            "flipped": view.flipped,
            "rotated": view.rotated,
            "content_box": torch.tensor(view.content_box, dtype=torch.int64),
        }
        for name, reader in self.caches.items():
            image_id = self.image_ids[index]
            if image_id in self.missing.get(name, ()):
                sample[f"teacher/{name}"] = _placeholder(reader)
                continue
            # int8 caches stay int8 until the training step dequantises the whole batch on its device.
            entry = dict(reader.read(image_id, flipped=view.flipped and reader.has_flip, dequantize=False))
            entry["offline_block"] = self._offline_block(name, view, entry, reader)
            entry["offline_ok"] = not entry["offline_block"]
            sample[f"teacher/{name}"] = entry
        return sample


def live_view_shift(view: StudentView, cached_affine: torch.Tensor, input_size: int, teacher_cls: Any) -> float:
    """Largest displacement, as a fraction of the teacher canvas, between where the cached pass saw
    a visible image point and where a live pass on this view would see it (the live pass feeds the
    view's content box to the teacher's own preprocessing, ``teacher_cls.input_affine``). 0 for a
    plain letterbox; grows with zoom and with crops that move the image in the teacher's frame."""
    x1, y1, x2, y2 = view.content_box
    live = teacher_cls.input_affine(max(y2 - y1, 1), max(x2 - x1, 1), input_size)
    worst = 0.0
    for axis, (lo, hi) in enumerate(((x1, x2), (y1, y2))):
        s, o = view.matrix[axis, axis], view.matrix[axis, 2]
        t, to = float(cached_affine[axis]), float(cached_affine[axis + 2])
        for edge in (lo, hi):  # displacement is linear in x: its extremes are at the visible edges
            x = (edge - o) / s  # original coordinate of this edge of the visible region
            worst = max(worst, abs(live[axis] * (s * x + o - lo) + live[axis + 2] - (t * x + to)))
    return worst / input_size


def _placeholder(reader: FeatureCacheReader) -> Dict[str, Any]:
    """Zero maps of the cached shapes for an image the cache lacks; never distilled (offline_ok=False)."""
    size = reader.input_size

    def zeros(c: int, h: int, w: int) -> Any:
        if reader.storage == "int8":
            return {"values": torch.zeros(c, h, w, dtype=torch.int8), "scale": torch.zeros(h, w),
                    "channel_scale": torch.zeros(c)}
        return torch.zeros(c, h, w, dtype=torch.float16)

    return {
        "features": {s.name: zeros(s.channels, size // s.stride, size // s.stride) for s in reader.feature_specs},
        "affine": torch.tensor([1.0, 1.0, 0.0, 0.0]),
        "valid_hw": torch.tensor([float(size), float(size)]),
        "input_size": size,
        "offline_ok": False,
        "offline_block": "images missing from the cache",
    }


def _stack(items: Sequence[Any]) -> Any:
    """Stack tensors, or dicts of tensors (int8 features with their scales) key by key."""
    if isinstance(items[0], dict):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return torch.stack(items)


def collate_detection(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch samples: ``images`` (B, 3, S, S); ``cls`` (N, 1); ``bboxes`` (N, 4) normalised xywh;
    ``batch_idx`` (N,) float (ultralytics' ``v8DetectionLoss`` batch format); ``affine`` (B, 4);
    ``orig_hw`` (B, 2); ``image_ids``; ``flipped``/``rotated`` (B,) bool; ``content_box`` (B, 4)
    canvas pixels with image content; ``teachers[name]`` = {features {name: (B, C, h, w) fp16},
    affine (B, 4), valid_hw (B, 2), input_size, offline_ok (B,) bool: the cached map can be
    carried onto this view}."""
    cls = [s["cls"] for s in samples]
    batch: Dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "cls": torch.cat(cls).float().view(-1, 1),
        "bboxes": torch.cat([s["bboxes"] for s in samples]).float().view(-1, 4),
        "batch_idx": torch.cat([torch.full((len(c),), float(i)) for i, c in enumerate(cls)]),
        "affine": torch.stack([s["affine"] for s in samples]),
        "orig_hw": torch.stack([s["orig_hw"] for s in samples]),
        "image_ids": [s["image_id"] for s in samples],
        "flipped": torch.tensor([s["flipped"] for s in samples]),
        "rotated": torch.tensor([s["rotated"] for s in samples]),
        "content_box": torch.stack([s["content_box"] for s in samples]),
        "teachers": {},
    }
    names = [k[len("teacher/"):] for k in samples[0] if k.startswith("teacher/")]
    for name in names:
        entries = [s[f"teacher/{name}"] for s in samples]
        batch["teachers"][name] = {
            "features": {f: _stack([e["features"][f] for e in entries]) for f in entries[0]["features"]},
            "affine": torch.stack([e["affine"] for e in entries]),
            "valid_hw": torch.stack([e["valid_hw"] for e in entries]),
            "input_size": int(entries[0]["input_size"]),
            "offline_ok": torch.tensor([bool(e["offline_ok"]) for e in entries]),
            "offline_block": [e["offline_block"] for e in entries],
        }
    return batch
