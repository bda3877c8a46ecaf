"""What a run draws while it evaluates: per head, input | ground truth | teacher | student |
overlays | |teacher - student| (``visualizations/<kind>_XXX.png``), and per distilled level the
teacher map's 3-component PCA next to the adapted student map under the same projection
(``..._pca.png``). Both also go to the run's loggers (TensorBoard, wandb) as images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from ultralytics.utils.nms import non_max_suppression
from ultralytics.utils.ops import process_mask, xywh2xyxy

from vfmkd.datasets.records import Batch
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.pairing.mask_grid import masks_on_grid, student_affine_of
from vfmkd.distillation.pairing.mask_pairs import class_union_maps
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.engine.pictures.feature_pca import pca_panel
from vfmkd.engine.pictures.prediction_panel import PanelRow, Prediction, render_panel, split_by_image
from vfmkd.engine.pictures.vis_canvas import visualization_path
from vfmkd.models.unified_model import StudentOutput

MASK_STRIDE = 4  # teacher masks are drawn on the student canvas at SAM's low-res stride


def semantic_class_names(dataset: Any) -> Optional[Dict[int, str]]:
    """Contiguous semantic index -> name of a dataset built with semantic labels, else None."""
    table = getattr(dataset, "semantic_table", None)
    return None if table is None else dict(enumerate(table.names))


def _detections(preds: torch.Tensor, nc: int, conf: float = 0.25, iou: float = 0.7) -> List[torch.Tensor]:
    return [d.float().cpu() for d in non_max_suppression(preds, conf_thres=conf, iou_thres=iou, max_det=100, nc=nc)]


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
        self.run_dir, self.kind, self.index, self.tasks = Path(run_dir), kind, index, dict(tasks)
        self.distiller, self.box_names, self.semantic_names = distiller, dict(box_names), semantic_names
        self.max_images, self.loggers = max_images, loggers
        self.written: List[Path] = []
        self.model: Any = None  # set by evaluate() (bind): a promptable head decodes the GT boxes with its module

    def bind(self, model: Any) -> None:
        self.model = model

    def _promptable_row(self, head: str, embeddings: torch.Tensor, batch: Batch,
                        teacher: Optional[Prediction]) -> PanelRow:
        """Prompts = the ground-truth instance boxes (drawn on every column); student = the masks the
        head decodes for them; teacher = its masks for the view's detection boxes; ground truth = the
        instance masks."""
        from vfmkd.tasks.scoring.promptable_metrics import decode_boxes

        n, size = len(batch), batch.images.shape[-1]
        inst = batch.instances
        if inst is None or self.model is None:
            raise ValueError(f"head {head}: drawing a promptable head needs instance labels and the model (evaluate "
                             "binds it)")
        idx = inst.batch_idx.view(-1).long()
        boxes = xywh2xyxy(inst.bboxes.float()) * size
        logits, scores = decode_boxes(self.model.heads[head], embeddings, idx.to(embeddings.device),
                                      boxes.to(embeddings.device))
        idx_cpu, cls = idx.cpu(), inst.cls.view(-1).cpu()
        per_boxes = split_by_image(boxes.cpu(), idx_cpu, n)
        per_cls = split_by_image(cls, idx_cpu, n)
        student = Prediction.instances(split_by_image(logits.sigmoid().cpu(), idx_cpu, n), per_cls, per_boxes,
                                       split_by_image(scores.cpu(), idx_cpu, n))
        target = Prediction.instances([m > 0.5 for m in split_by_image(inst.masks.cpu(), idx_cpu, n)], per_cls,
                                      per_boxes)
        return PanelRow(f"{head} (GT box prompts)", student, teacher, target, class_names=self.box_names)

    def _teacher_classes(self, head: str, task: str, logits: torch.Tensor, batch: Batch,
                         targets: Mapping[str, TeacherTargets]) -> Optional[Prediction]:
        """A semantic/binary head's teacher as its output distillation sees it: per channel the union
        of the teacher's box-prompted masks of that channel's classes (binary: of data.binary_classes).
        None when no output term pairs this head with a mask teacher that has masks this batch."""
        for term in (self.distiller.terms.values() if self.distiller is not None else ()):
            pairing, target = term.pairing, targets.get(term.teacher)
            if term.head != head or pairing is None or pairing.channel_of_class is None or target is None:
                continue
            maps = class_union_maps(logits.float(), batch, target, pairing.channel_of_class)
            if maps is None:
                continue
            probs = maps.sigmoid().cpu()
            if task == "binary":
                return Prediction.binary(probs[:, 0])
            labels = probs.argmax(1)
            labels[probs.amax(1) <= 0.5] = 0  # no class's mask covers the cell: unlabelled, not drawn
            return Prediction.semantic(labels=labels)
        return None

    def rows(self, out: StudentOutput, batch: Batch, targets: Mapping[str, TeacherTargets]) -> List[PanelRow]:
        n, size = len(batch), batch.images.shape[-1]
        teacher = _teacher_masks(targets, batch)
        rows = []
        for head, task in self.tasks.items():
            output = out.heads[head]
            if task == "detection":
                dets = _detections(output[0], len(self.box_names))
                gt = [batch.boxes.of_image(i) for i in range(n)]
                rows.append(PanelRow(head,
                                     Prediction.detections([d[:, :4] for d in dets], [d[:, 5] for d in dets],
                                                           [d[:, 4] for d in dets]),
                                     None,
                                     Prediction.detections([xywh2xyxy(b.cpu().float()) * size for _, b in gt],
                                                           [c.cpu() for c, _ in gt]),
                                     class_names=self.box_names))
            elif task == "instance":
                (preds, proto), _ = output
                dets = _detections(preds, len(self.box_names))
                masks = [process_mask(proto[i].float().cpu(), d[:, 6:], d[:, :4], (size, size), upsample=True) > 0.5
                         if len(d) else torch.zeros(0, size, size, dtype=torch.bool) for i, d in enumerate(dets)]
                inst = batch.instances
                assert inst is not None
                idx = inst.batch_idx.long().cpu()
                rows.append(PanelRow(head,
                                     Prediction.instances(masks, [d[:, 5] for d in dets], [d[:, :4] for d in dets]),
                                     teacher,
                                     Prediction.instances([m > 0.5 for m in split_by_image(inst.masks.cpu(), idx, n)],
                                                          split_by_image(inst.cls.view(-1).cpu(), idx, n)),
                                     class_names=self.box_names))
            elif task == "promptable":
                rows.append(self._promptable_row(head, output, batch, teacher))
            elif task == "semantic":
                assert batch.semantic is not None
                rows.append(PanelRow(head, Prediction.semantic(probs=output.float().softmax(1).cpu()),
                                     self._teacher_classes(head, task, output, batch, targets) or teacher,
                                     Prediction.semantic(labels=batch.semantic.cpu()), class_names=self.semantic_names))
            else:  # binary
                assert batch.binary is not None
                rows.append(PanelRow(head, Prediction.binary(output.float().sigmoid().cpu()),
                                     self._teacher_classes(head, task, output, batch, targets) or teacher,
                                     Prediction.binary_target(batch.binary.cpu())))
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
