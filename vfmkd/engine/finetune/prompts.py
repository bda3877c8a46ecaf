"""Prompted masks for fine-tuning SAM: each image in SAM's own input frame with its instance masks,
and the prompts sampled from those labels (the ground-truth box, or points drawn inside the mask)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from vfmkd.core.config import resolve_path
from vfmkd.core.errors import ConfigError, DatasetError, did_you_mean
from vfmkd.datasets.coco_yolo import DetectionDataset
from vfmkd.datasets.image_files import load_rgb
from vfmkd.datasets.masks import DETECTION_CONFIG, MASK_RATIO, instance_targets, read_names
from vfmkd.teachers.base import TeacherBatch

Preprocess = Callable[[Sequence[np.ndarray]], TeacherBatch]


@dataclass
class PromptedImage:
    """One image for SAM: ``pixels`` (3, S, S) float32 in SAM's input frame (resized longest side,
    padded bottom-right, normalised), ``masks`` (n, S/4, S/4) float32 {0, 1} in the frame of SAM's
    low-res mask logits, ``boxes`` (n, 4) float32 x1, y1, x2, y2 in input pixels, ``valid`` (S/4, S/4)
    bool: the mask pixels over image content (not padding). n may be 0."""

    image_id: str
    pixels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor


@dataclass
class Prompts:
    """SAM prompts for ``index`` (k,) int64 rows of an image's instances: ``boxes`` (k, 4) input pixels,
    or ``points`` (k, P, 2) x, y input pixels with ``labels`` (k, P) int (1 = foreground)."""

    index: torch.Tensor
    boxes: Optional[torch.Tensor] = None
    points: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None


class PromptedMaskSet(torch.utils.data.Dataset):
    """The instance masks of one split (vfmkd's layout, ``instance_segmentation`` labels), each image
    preprocessed by the teacher's own ``preprocess`` (input size ``size``); ``classes``: detection class
    names kept (empty: all). Images without instance labels give n = 0 (no loss)."""

    def __init__(self, root: str, split: str, size: int, preprocess: Preprocess, classes: Sequence[str] = (),
                 limit: Optional[int] = None) -> None:
        self.data = DetectionDataset(root, split, img_size=size, limit=limit, instances=True)
        self.size, self.preprocess = size, preprocess
        self.keep = class_ids(root, classes)
        counted = [p for p in self.data.polygons if p is not None]
        if self.keep is not None and not any(np.isin(p[0], self.keep).any() for p in counted):
            raise DatasetError(f"no instance of {list(classes)} in {len(self.data)} images of {root}/{split}")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> PromptedImage:
        img = load_rgb(self.data.paths[index])
        h, w = img.shape[:2]
        batch = self.preprocess([img])
        sx, sy = float(batch.affine[0, 0]), float(batch.affine[0, 1])
        side = self.size // MASK_RATIO
        valid = torch.zeros(side, side, dtype=torch.bool)
        vh, vw = (int(v) for v in batch.valid_hw[0])
        valid[: -(-vh // MASK_RATIO), : -(-vw // MASK_RATIO)] = True
        masks, boxes = torch.zeros(0, side, side), torch.zeros(0, 4)
        labels = self.data.polygons[index]
        if labels is not None:
            cls, polys, rows = labels
            matrix = np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0]])  # original pixel -> SAM input pixel
            inst = instance_targets(cls, polys, rows, w, h, matrix, self.size, drop_small=False)
            keep = inst.masks.flatten(1).sum(1) > 0
            if self.keep is not None:
                keep &= torch.from_numpy(np.isin(inst.cls.numpy().astype(np.int64), self.keep))
            masks = inst.masks[keep].float()
            cxcywh = inst.boxes[keep] * self.size
            boxes = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
        return PromptedImage(self.data.image_ids[index], batch.pixels[0], masks, boxes, valid)


def class_ids(root: str, classes: Sequence[str]) -> Optional[np.ndarray]:
    """Detection class ids of ``classes`` (names of the dataset's object_detection/config.yaml); None: all."""
    if not classes:
        return None
    names = read_names(resolve_path(root) / DETECTION_CONFIG, "names")
    by_name = {n: i for i, n in names.items()}
    missing = [c for c in classes if c not in by_name]
    if missing:
        raise ConfigError(f"data.classes: {missing[0]!r} is not a class of {root}/{DETECTION_CONFIG}."
                          f"{did_you_mean(missing[0], list(by_name))}")
    return np.array([by_name[c] for c in classes], np.int64)


def sample_prompts(item: PromptedImage, kinds: Sequence[str], num_points: int, max_prompts: int,
                   generator: torch.Generator) -> Prompts:
    """Prompts for up to ``max_prompts`` instances of ``item`` (a random subset beyond that), all of one
    kind drawn from ``kinds``: the ground-truth box, or ``num_points`` foreground points drawn uniformly
    among each mask's pixels (at the centre of a low-res mask pixel)."""
    n = len(item.masks)
    index = torch.randperm(n, generator=generator)[:max_prompts] if n > max_prompts else torch.arange(n)
    kind = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    if kind == "box":
        return Prompts(index, boxes=item.boxes[index])
    points: List[torch.Tensor] = []
    for row in index.tolist():
        ys, xs = torch.nonzero(item.masks[row] > 0, as_tuple=True)
        pick = torch.randint(len(ys), (num_points,), generator=generator)
        points.append(torch.stack([xs[pick], ys[pick]], 1).float().add(0.5).mul(MASK_RATIO))
    coords = torch.stack(points) if points else torch.zeros(0, num_points, 2)
    return Prompts(index, points=coords, labels=torch.ones(coords.shape[:2], dtype=torch.int))


def box_prompts(item: PromptedImage) -> Prompts:
    """Every instance prompted by its ground-truth box (the validation prompts: deterministic)."""
    return Prompts(torch.arange(len(item.masks)), boxes=item.boxes)
