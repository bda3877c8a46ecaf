"""YOLO-format detection dataset (coco128 layout), optionally with instance and semantic masks.

Layout: ``root/images/<split>/*.jpg`` and ``root/object_detection/labels/<split>/<stem>.txt`` with
one ``class cx cy w h`` line per box (normalised to 0..1). Images are letterboxed the YOLO way and
the letterbox is recorded as the same per-axis affine the teachers use (see
:class:`vfmkd.teachers.base.TeacherBatch`), so teacher and student cells can be matched. Instance
polygons and semantic masks (:mod:`vfmkd.datasets.masks`) go through the same view as the boxes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vfmkd.core.config import resolve_path
from vfmkd.core.errors import DatasetError
from vfmkd.datasets.image_files import check_images, list_images, load_rgb, pil_open
from vfmkd.datasets.masks import (
    InstanceClassTable,
    SemanticClassTable,
    check_mask_size,
    instance_label_dir,
    instance_targets,
    match_label_rows,
    parse_polygons,
    read_mask,
    semantic_mask_dir,
    semantic_targets,
)
from vfmkd.datasets.records import BoxTargets, Sample
from vfmkd.datasets.sources.split_list import SplitList, check_unique_ids
from vfmkd.datasets.transforms import GeometricAugment, student_view, transform_boxes

LOGGER = logging.getLogger("vfmkd")
DEFAULT_CLASSES_KEY = "model.heads.detection.num_classes"  # the builders pass the run's own box head key


def parse_labels(path: Path, num_classes: int, classes_key: str = DEFAULT_CLASSES_KEY) -> np.ndarray:
    """(n, 5) float32 rows ``class cx cy w h`` of a YOLO label file; a missing file means no objects.
    A line repeating an earlier line's values exactly is dropped with a warning naming both lines
    (a duplicated box would count twice in the loss and as a false negative in mAP).
    ``classes_key``: the setting that gave ``num_classes`` (named by the out-of-range error)."""
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows: List[List[float]] = []
    seen: Dict[Tuple[float, ...], int] = {}
    duplicates: List[str] = []
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
                f"{where}: class id {parts[0]} is outside [0, {num_classes}) ({classes_key}={num_classes}). "
                f"Fix the label, or set {classes_key} to the dataset's class count."
            )
        cx, cy, bw, bh = values[1:]
        if min(cx, cy, bw, bh) < 0 or max(cx, cy, bw, bh) > 1:
            raise DatasetError(f"{where}: box {cx} {cy} {bw} {bh} is not normalised to [0, 1] (YOLO cx cy w h)")
        key = tuple(values)
        if key in seen:
            duplicates.append(f"{lineno} (= line {seen[key]})")
            continue
        seen[key] = lineno
        rows.append(values)
    if duplicates:
        LOGGER.warning(f"{path}: dropped {len(duplicates)} duplicate label line(s): line {', line '.join(duplicates)}")
    return np.asarray(rows, np.float32).reshape(-1, 5)


class DetectionDataset(Dataset):
    """Letterboxed (optionally augmented) images with their YOLO boxes, one split.

    ``dataset[i]`` is a :class:`Sample`: the canvas, its :class:`ViewGeometry` and its
    :class:`BoxTargets`. Unreadable images are skipped, counted and named (``self.skipped``).

    The images and labels come from vfmkd's folder layout under ``root``, or from ``source`` (a
    :class:`~vfmkd.datasets.sources.SplitList` read from an ultralytics YAML, a COCO JSON or an image
    folder); ``unlabelled`` adds images without labels (``self.labelled[i]`` False: task losses skip
    them, feature and output distillation use them).

    ``instances``: also the instance polygons (``root/instance_segmentation``, or the source's) as
    :class:`~vfmkd.datasets.records.InstanceTargets`; ``semantic``: the semantic masks
    (``root/semantic_segmentation/masks``) as (S, S) contiguous class indices; ``binary_classes``:
    semantic class names whose pixels form a binary mask (also read from the semantic masks).
    Images without labels of a requested kind carry None for it and are listed in
    ``self.unlabelled[kind]`` (kind: instances | semantic | binary); a requested kind that no image
    of the split has is an error.
    """

    def __init__(
        self,
        root: str,
        split: str,
        img_size: int = 640,
        limit: Optional[int] = None,
        num_classes: int = 80,
        augment: Optional[GeometricAugment] = None,
        seed: int = 0,
        instances: bool = False,
        semantic: bool = False,
        binary_classes: Sequence[str] = (),
        classes_key: str = DEFAULT_CLASSES_KEY,
        source: Optional[SplitList] = None,
        unlabelled: Sequence[Path] = (),
    ) -> None:
        self.root, self.split, self.img_size, self.num_classes = resolve_path(root), split, int(img_size), num_classes
        self.classes_key = classes_key  # the setting behind num_classes, named by class-id errors
        self.limit = limit
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed, self.epoch = seed, 0
        self.source = source
        listed = list_images(self.root, split, limit) if source is None else source.paths[:limit]
        extra = list(unlabelled)[:limit]
        check_unique_ids(listed + extra, f"split {split}")
        self.paths, self.orig_sizes, self.skipped = check_images(listed + extra, split)
        if not self.paths:
            raise DatasetError(f"none of the {len(listed) + len(extra)} images of split {split} "
                               f"({source.source if source is not None else self.root / 'images' / split}) can be "
                               f"decoded")
        self.image_ids = [p.stem for p in self.paths]
        position = {p: i for i, p in enumerate(listed)}  # listed image -> its entry in the source
        rows = [position.get(p) for p in self.paths]  # None: an image of `unlabelled`
        self.labelled = [r is not None and (source is None or source.boxes[r] is not None) for r in rows]
        if source is None:
            label_dir = self.root / "object_detection" / "labels" / split
            self.labels = [parse_labels(label_dir / f"{i}.txt", num_classes, classes_key) if lab
                           else np.zeros((0, 5), np.float32) for i, lab in zip(self.image_ids, self.labelled)]
        else:
            self.labels = [source.boxes[r] if lab else np.zeros((0, 5), np.float32)  # type: ignore[index,misc]
                           for r, lab in zip(rows, self.labelled)]
        self._source_rows = rows
        if isinstance(binary_classes, str):
            binary_classes = (binary_classes,)
        self.binary_classes = tuple(str(n) for n in binary_classes)
        self.kinds: Tuple[str, ...] = tuple(k for k, on in (("instances", instances), ("semantic", semantic),
                                                            ("binary", bool(self.binary_classes))) if on)
        self.unlabelled: Dict[str, List[str]] = {}
        # per image: (detection class ids (n,), polygons, label rows (n,)) or None (no instance labels)
        self.polygons: List[Optional[Tuple[np.ndarray, List[np.ndarray], np.ndarray]]] = []
        self.mask_paths: List[Optional[Path]] = []
        self.semantic_table: Optional[SemanticClassTable] = None
        self.binary_index: Optional[np.ndarray] = None
        if instances:
            self._load_instances()
        if semantic or self.binary_classes:
            self._load_semantic()
        self._log_summary()

    @property
    def names(self) -> Optional[Dict[int, str]]:
        """The class table of a source that has one (ultralytics YAML, COCO JSON); None for vfmkd's layout."""
        return self.source.names if self.source is not None and self.source.names else None

    def _log_summary(self) -> None:
        """One line per split: images, labelled, classes, where from; then the images without a label kind."""
        labelled = sum(self.labelled)
        classes = len(self.names) if self.names is not None else self.num_classes if labelled else 0
        where = self.source.source if self.source is not None else f"{self.root} (vfmkd layout)"
        LOGGER.info(f"data {self.split}: {len(self.paths)} images, {labelled} labelled, "
                    f"{len(self.paths) - labelled} unlabelled, {classes} classes; from {where}")
        counts = ", ".join(f"{kind} {len(ids)}" for kind, ids in self.unlabelled.items() if ids)
        if counts:
            LOGGER.info(f"{self.split}: images without labels (skipped by that kind's losses, of {len(self.paths)}): "
                        f"{counts}")

    def _no_labels(self, kind: str, folder: Path, pattern: str) -> DatasetError:
        return DatasetError(
            f"a {kind} segmentation head with no mask labels in the dataset: none of the {len(self.paths)} images of "
            f"{self.root / 'images' / self.split} has a {kind} label; expected {folder}/<image id>{pattern}"
        )

    def _load_instances(self) -> None:
        if self.source is not None:
            self._source_instances(self.source)
            return
        table = InstanceClassTable.load(self.root, self.num_classes, self.classes_key)
        folder = instance_label_dir(self.root, self.split)
        missing: List[str] = []
        for image_id, labels, labelled in zip(self.image_ids, self.labels, self.labelled):
            path = folder / f"{image_id}.txt"
            if not labelled or not path.is_file():
                self.polygons.append(None)
                missing.append(image_id)
                continue
            cls, polys = parse_polygons(path, table)
            self.polygons.append((cls, polys, match_label_rows(cls, polys, labels)))
        if len(missing) == len(self.paths):
            raise self._no_labels("instance", folder, ".txt (YOLO-seg polygons)")
        self.unlabelled["instances"] = missing

    def _source_instances(self, source: SplitList) -> None:
        """The polygons of a source (already matched to its box rows)."""
        self.polygons = [source.polygons[r] if r is not None else None for r in self._source_rows]
        missing = [i for i, p in zip(self.image_ids, self.polygons) if p is None]
        if len(missing) == len(self.paths):
            raise DatasetError(f"an instance segmentation head with no mask labels: none of the {len(self.paths)} "
                               f"images of {source.source} has a polygon (ultralytics: 'cls x1 y1 x2 y2 ...' lines; "
                               f"COCO: 'segmentation' polygons or RLE)")
        self.unlabelled["instances"] = missing

    def _load_semantic(self) -> None:
        if self.source is not None:
            raise DatasetError(f"semantic and binary masks are read from vfmkd's layout (semantic_segmentation/masks/"
                               f"<split>/<id>.png); {self.source.source} has none: use data.format=vfmkd for a "
                               f"semantic or binary head")
        self.semantic_table = SemanticClassTable.load(self.root)
        if self.binary_classes:
            self.binary_index = self.semantic_table.indices_of(self.binary_classes)
        folder = semantic_mask_dir(self.root, self.split)
        opener = pil_open()
        missing: List[str] = []
        for image_id, image, hw, labelled in zip(self.image_ids, self.paths, self.orig_sizes, self.labelled):
            path = folder / f"{image_id}.png"
            if labelled and path.is_file():
                check_mask_size(path, image, hw, opener)
                self.mask_paths.append(path)
            else:
                self.mask_paths.append(None)
                missing.append(image_id)
        if len(missing) == len(self.paths):
            raise self._no_labels("binary" if "semantic" not in self.kinds else "semantic", folder, ".png")
        for kind in ("semantic", "binary"):
            if kind in self.kinds:
                self.unlabelled[kind] = list(missing)

    @property
    def semantic_num_classes(self) -> Optional[int]:
        """Classes of a semantic head on this dataset (index 0 = unlabeled included); None without masks."""
        return self.semantic_table.num_classes if self.semantic_table is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index): reproducible with any worker count.
        Call before each epoch (DataLoader workers must not be persistent to see it)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> Sample:
        img = load_rgb(self.paths[index])
        h, w = img.shape[:2]
        rng = np.random.default_rng((self.seed, self.epoch, index)) if self.augment else None
        view = student_view(img, self.img_size, self.augment, rng)
        drop = self.augment is not None
        boxes, kept = transform_boxes(self.labels[index], w, h, view, self.img_size, drop_small=drop, return_kept=True)
        instances = semantic = binary = None
        if "instances" in self.kinds and self.polygons[index] is not None:
            cls, polys, rows = self.polygons[index]  # type: ignore[misc]
            instances = instance_targets(cls, polys, rows, w, h, view.matrix, self.img_size, drop_small=drop)
        mask_path = self.mask_paths[index] if self.mask_paths else None
        if mask_path is not None and self.semantic_table is not None:
            raw = read_mask(mask_path, self.paths[index], (h, w), pil_open())
            sem, binary = semantic_targets(self.semantic_table.encode(raw, mask_path), view.matrix, self.img_size,
                                           self.binary_index)
            semantic = sem if "semantic" in self.kinds else None
        return Sample(
            image=torch.from_numpy(np.ascontiguousarray(view.canvas.transpose(2, 0, 1))).float().div_(255.0),
            image_id=self.image_ids[index],
            view=view.geometry((h, w)),
            boxes=BoxTargets(cls=torch.from_numpy(boxes[:, 0].copy()), boxes=torch.from_numpy(boxes[:, 1:5].copy()),
                             label_index=torch.from_numpy(kept)),
            instances=instances,
            semantic=semantic,
            binary=binary,
            kinds=self.kinds,
            labelled=self.labelled[index],
        )
