"""What a run draws while it evaluates: per head, input | ground truth | teacher | student |
overlays | |teacher - student| (``visualizations/<kind>_XXX.png``; each head's task says what its row
shows: ``Task.picture_row``, the engine computes the teacher columns and draws), and per distilled level the
teacher map's 3-component PCA next to the adapted student map under the same projection
(``..._pca.png``). Both also go to the run's loggers (TensorBoard, wandb) as images."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from vfmkd.datasets.records import Batch
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.pairing.mask_grid import masks_on_grid, student_affine_of
from vfmkd.distillation.pairing.mask_pairs import class_union_maps
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.engine.pictures.feature_pca import pca_panel
from vfmkd.engine.pictures.prediction_panel import render_panel
from vfmkd.engine.pictures.vis_canvas import visualization_path
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks import get_task
from vfmkd.tasks.pictures import PanelRow, PictureContext, Prediction, split_by_image

MASK_STRIDE = 4  # teacher masks are drawn on the student canvas at SAM's low-res stride


def semantic_class_names(dataset: Any) -> Optional[Dict[int, str]]:
    """Contiguous semantic index -> name of a dataset built with semantic labels, else None."""
    table = getattr(dataset, "semantic_table", None)
    return None if table is None else dict(enumerate(table.names))


def _teacher_masks(targets: Mapping[str, TeacherTargets], batch: Batch) -> Optional[Prediction]:
    """The box-prompted masks of the first teacher that has them, carried onto the student canvas."""
    size = batch.images.shape[-1]
    for target in targets.values():
        if target.mask_logits is None:
            continue
        masks = target.mask_logits.to_float(batch.images.device)
        grid = (size // MASK_STRIDE, size // MASK_STRIDE)
        logits, valid = masks_on_grid(masks.logits, masks.batch_idx, target, student_affine_of(target, batch), grid,
                                      MASK_STRIDE)
        probs = (logits.sigmoid() * valid).cpu()
        n = len(batch)
        per_image = split_by_image(probs, masks.batch_idx.cpu(), n)
        classes = split_by_image(masks.cls.cpu(), masks.batch_idx.cpu(), n)
        return Prediction.instances([p > 0.5 for p in per_image], classes)
    return None


class EpochVisualizer:
    """``on_batch(step, out, batch, targets)`` draws the first evaluation batch (an ``evaluate`` hook)."""

    def __init__(self, run_dir: Path, kind: str, index: int, tasks: Mapping[str, str], distiller: Optional[Distiller],
                 box_names: Mapping[int, str], semantic_names: Optional[Mapping[int, str]], max_images: int = 4,
                 loggers: Any = None) -> None:
        self.run_dir, self.kind, self.index = Path(run_dir), kind, index
        self.tasks = {head: get_task(task) for head, task in tasks.items()}
        self.distiller, self.box_names, self.semantic_names = distiller, dict(box_names), semantic_names
        self.max_images, self.loggers = max_images, loggers
        self.written: List[Path] = []
        self.model: Any = None  # set by evaluate() (bind): a promptable head decodes the GT boxes with its module

    def bind(self, model: Any) -> None:
        self.model = model

    def _teacher_class_maps(self, head: str, logits: torch.Tensor, batch: Batch,
                            targets: Mapping[str, TeacherTargets]) -> Optional[torch.Tensor]:
        """A dense head's teacher as its output distillation sees it: (B, C, h, w) probabilities, per
        channel the union of the teacher's box-prompted masks of that channel's classes (binary: of
        data.binary_classes). None when no output term pairs this head with a mask teacher that has masks
        this batch."""
        for term in (self.distiller.terms.values() if self.distiller is not None else ()):
            pairing, target = term.pairing, targets.get(term.teacher)
            if term.head != head or pairing is None or pairing.channel_of_class is None or target is None:
                continue
            maps = class_union_maps(logits.float(), batch, target, pairing.channel_of_class)
            if maps is not None:
                return maps.sigmoid().cpu()
        return None

    def rows(self, out: StudentOutput, batch: Batch, targets: Mapping[str, TeacherTargets]) -> List[PanelRow]:
        """One picture row per head, as the head's task fills it in; the engine computes the teacher columns."""
        teacher = _teacher_masks(targets, batch)
        rows = []
        for head, task in self.tasks.items():
            context = PictureContext(
                self.box_names, self.semantic_names,
                head_module=self.model.heads[head] if self.model is not None else None,
                teacher_masks=teacher,
                teacher_class_maps=partial(self._teacher_class_maps, head, batch=batch, targets=targets))
            rows.append(task.picture_row(head, task.read_output(out.heads[head]), batch, context))
        return rows

    @torch.no_grad()
    def on_batch(self, step: int, out: StudentOutput, batch: Batch, targets: Mapping[str, TeacherTargets]) -> None:
        if step != 0:
            return
        images = batch.images.float().cpu()
        path = render_panel(visualization_path(self.run_dir, self.kind, self.index), images,
                            self.rows(out, batch, targets),
                            batch.image_ids, max_images=self.max_images, title=f"{self.kind} {self.index}")
        self.written.append(path)
        teacher_maps, student_maps, valid = {}, {}, {}
        if self.distiller is not None:
            for module in self.distiller.feature_terms(active_only=False).values():
                target = targets.get(module.teacher)
                if target is None:
                    continue
                student, teacher_map, mask = self.distiller.aligned(module, out, batch, target)
                if teacher_map.shape[-2:] == (1, 1):
                    continue  # a 1x1 summary (CLS token) has no picture
                key = f"{module.teacher}/{module.teacher_feature}@{module.student_level}"
                teacher_maps[key], student_maps[key] = teacher_map.cpu(), module.adapter(student.float()).cpu()
                valid[key] = mask[:, 0].cpu() > 0
        if teacher_maps:
            self.written.append(
                pca_panel(
                    visualization_path(self.run_dir, self.kind, self.index, "_pca"),
                    teacher_maps,
                    student_maps,
                    images=images,
                    valid=valid,
                    image_ids=batch.image_ids,
                    max_images=self.max_images,
                    title=f"{self.kind} {self.index}: teacher PCA | student",
                )
            )
        if self.loggers is not None:
            for p in self.written:
                self.loggers.add_image("vis/pca" if p.stem.endswith("_pca") else "vis/panel", p, self.index)
