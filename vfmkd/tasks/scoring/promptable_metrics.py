"""Scoring a promptable (``sam_decoder``) head: every ground-truth instance's box is the prompt.

:class:`PromptableScorer` has the interface of the other scorers plus ``wants_targets = True``
(``update(out, batch, targets)``: :func:`vfmkd.engine.evaluation.evaluator.evaluate` hands it the teachers'
targets of the batch when a router is there) and ``bind(model)`` (``evaluate`` gives it the model,
whose head module does the prompting: ``head.decode``).

Space: everything is scored on the student canvas at stride 4 (S/4 x S/4), the grid of the batch's
instance masks and of the decoder's low-res logits (as ultralytics' validator scores masks on the
prototype grid). A predicted mask is ``logit > 0``.

- ``mIoU``: per instance IoU of the mask its box prompts vs its ground-truth mask, averaged over
  the instances of the split (the primary metric; per class: ``per_class_iou`` {name: mean IoU}).
- ``teacher_mIoU`` (MobileSAM's "alignment" mIoU): the detection boxes of the view that the
  teacher was prompted with (matched by image and ``label_index``) prompt the student too; IoU
  against the teacher's mask carried onto the same grid (the ``teacher_prompts`` the scorer is given:
  distillation's ``prompts_on_grid``), over the cells inside the teacher's valid region. Only when the
  targets carry ``mask_logits`` (a cached ``--outputs features,masks`` split or a live mask teacher)
  and the scorer has ``teacher_prompts``; the first such teacher (by name)
  counts, every one is listed in ``teacher_mIoU_by_teacher``.
- ``mask_mAP50`` / ``mask_mAP50-95``: COCO-style mask AP with ground-truth boxes as prompts, with
  ultralytics' metric code: each prompt gives one prediction of its box's class scored by the
  decoder's ``iou_pred``; ultralytics' greedy matching at mask IoU 0.50:0.05:0.95 per image.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import DetMetrics, mask_iou

from vfmkd.datasets.records import Batch
from vfmkd.models.unified_model import StudentOutput
from vfmkd.tasks.scoring.common import IOU_THRESHOLDS
from vfmkd.tasks.scoring.context import TeacherPrompts

if TYPE_CHECKING:
    from vfmkd.tasks.promptable import PromptableOutput

MASK_STRIDE = 4
#: prompts decoded at once (the two-way transformer's memory grows with the prompt count)
DECODE_CHUNK = 64


def canvas_boxes_xyxy(bboxes_cxcywh: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised cx, cy, w, h -> canvas pixels x1, y1, x2, y2 (the prompts' frame)."""
    b = bboxes_cxcywh.float() * size
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1)


def decode_boxes(head: Any, embeddings: torch.Tensor, batch_idx: torch.Tensor,
                 boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``head.decode`` with one box prompt per row, in chunks -> (N, h, w) logits, (N,) iou_pred."""
    logits: List[torch.Tensor] = []
    scores: List[torch.Tensor] = []
    for start in range(0, len(boxes), DECODE_CHUNK):
        sl = slice(start, start + DECODE_CHUNK)
        low, iou = head.decode(embeddings, batch_idx[sl].long(), boxes=boxes[sl].float())
        logits.append(low[:, 0].float())
        scores.append(iou[:, 0].float())
    if not logits:
        h, w = (4 * s for s in embeddings.shape[-2:])
        return torch.zeros((0, h, w), device=embeddings.device), torch.zeros(0, device=embeddings.device)
    return torch.cat(logits), torch.cat(scores)


def pairwise_iou(pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-wise IoU of (N, H, W) bool masks (within ``valid`` cells when given); 0/0 -> 1 (both empty)."""
    p, t = pred.bool(), target.bool()
    if valid is not None:
        v = valid.bool()
        p, t = p & v, t & v
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class PromptableScorer:
    """Box-prompted mIoU vs ground truth, alignment mIoU vs the teacher, mask AP and per-class IoU
    of a ``sam_decoder`` head (module docstring). ``names``: detection class id -> name; ``head``:
    the head's name in ``StudentOutput.heads`` (its output = the image embeddings); ``module``: the
    head module (its ``decode``), else taken from the model :meth:`bind` is given; ``teacher_prompts``:
    how the teachers' masks pair with the batch's boxes (:data:`TeacherPrompts`; None: no alignment);
    ``read_output``: the task's reader of the head's output (the embeddings record).

    ``result()``: ``mIoU``, ``teacher_mIoU`` (NaN without teacher masks), ``teacher_mIoU_by_teacher``,
    ``mask_mAP50``, ``mask_mAP50-95``, ``per_class_iou``, ``instances``, ``teacher_instances``,
    ``images``, ``skipped`` (images without instance labels)."""

    wants_targets = True

    def __init__(self, names: Mapping[int, str], head: str = "promptable", module: Any = None,
                 teacher_prompts: Optional[TeacherPrompts] = None, *,
                 read_output: Callable[[Any], PromptableOutput]) -> None:
        self.names, self.head, self.module, self.teacher_prompts = dict(names), head, module, teacher_prompts
        self.read_output = read_output
        self.metrics = DetMetrics(names=dict(names))
        self.matcher = SimpleNamespace(iouv=IOU_THRESHOLDS)  # match_predictions only reads `iouv`
        self.iou_sum, self.instances = 0.0, 0
        self.class_sums: Dict[int, Tuple[float, int]] = {}
        self.teacher_sums: Dict[str, Tuple[float, int]] = {}
        self.images = self.skipped = 0

    def bind(self, model: Any) -> None:
        """Take the head module from ``model.heads`` unless one was given."""
        if self.module is None:
            self.module = model.heads[self.head]

    def update(self, out: StudentOutput, batch: Batch, targets: Optional[Mapping[str, Any]] = None) -> None:
        if self.module is None:
            raise ValueError("PromptableScorer: no head module (pass module= or call bind(model) first)")
        if batch.instances is None:
            raise ValueError("PromptableScorer: the batch carries no instance targets (dataset built without "
                             "instances=True)")
        embeddings = self.read_output(out.heads[self.head]).embeddings
        inst, size = batch.instances, batch.images.shape[-1]
        device = embeddings.device
        idx = inst.batch_idx.view(-1).long().to(device)
        boxes = canvas_boxes_xyxy(inst.bboxes.to(device), size)
        logits, scores = decode_boxes(self.module, embeddings, idx, boxes)
        gt = inst.masks.to(device) > 0.5
        if logits.shape[-2:] != gt.shape[-2:]:
            raise ValueError(f"PromptableScorer: decoder masks {tuple(logits.shape[-2:])} vs instance masks "
                             f"{tuple(gt.shape[-2:])}: both should be the canvas at stride {MASK_STRIDE}")
        pred = logits > 0
        ious = pairwise_iou(pred, gt).cpu()
        cls = inst.cls.view(-1).long().cpu()
        self.iou_sum += float(ious.sum())
        self.instances += len(ious)
        for k, v in zip(cls.tolist(), ious.tolist()):
            s, n = self.class_sums.get(k, (0.0, 0))
            self.class_sums[k] = (s + v, n + 1)
        self._ap(batch, pred.cpu(), gt.cpu(), scores.cpu(), cls, idx.cpu())
        if targets and self.teacher_prompts is not None:
            self._alignment(embeddings, batch, targets, self.teacher_prompts)

    def _ap(self, batch: Batch, pred: torch.Tensor, gt: torch.Tensor, scores: torch.Tensor, cls: torch.Tensor,
            idx: torch.Tensor) -> None:
        labelled = batch.instances.labelled  # type: ignore[union-attr]
        for i in range(len(batch)):
            if not bool(labelled[i]):
                self.skipped += 1
                continue
            rows = idx == i
            c = cls[rows].float()
            if rows.any():
                m_ious = mask_iou(gt[rows].flatten(1).float(), pred[rows].flatten(1).float())
                tp = BaseValidator.match_predictions(self.matcher, c, c, m_ious).numpy()
            else:
                tp = np.zeros((0, len(IOU_THRESHOLDS)), dtype=bool)
            self.metrics.update_stats({
                "tp": tp, "conf": scores[rows].numpy(), "pred_cls": c.numpy(), "target_cls": c.numpy(),
                "target_img": np.unique(c.numpy()), "im_name": batch.image_ids[i],
            })
            self.images += 1

    def _alignment(self, embeddings: torch.Tensor, batch: Batch, targets: Mapping[str, Any],
                   teacher_prompts: TeacherPrompts) -> None:
        grid = (4 * embeddings.shape[-2], 4 * embeddings.shape[-1])
        for name in sorted(targets):
            prompts = teacher_prompts(batch, targets[name], grid, MASK_STRIDE, embeddings.device)
            if prompts is None:
                continue
            s, n = self.teacher_sums.get(name, (0.0, 0))
            if len(prompts.rows):
                logits, _ = decode_boxes(self.module, embeddings, prompts.batch_idx, prompts.boxes)
                ious = pairwise_iou(logits > 0, prompts.logits > 0, prompts.valid > 0)
                s, n = s + float(ious.sum()), n + len(ious)
            self.teacher_sums[name] = (s, n)

    def result(self) -> Dict[str, Any]:
        self.metrics.process(plot=False)
        _, _, map50, map5095 = (float(v) for v in self.metrics.mean_results())
        by_teacher = {k: s / n for k, (s, n) in self.teacher_sums.items() if n}
        first = next(iter(sorted(by_teacher)), None)
        return {
            "mIoU": self.iou_sum / self.instances if self.instances else float("nan"),
            "teacher_mIoU": by_teacher[first] if first is not None else float("nan"),
            "teacher_mIoU_by_teacher": by_teacher,
            "mask_mAP50": map50, "mask_mAP50-95": map5095,
            "per_class_iou": {self.names.get(k, str(k)): s / n for k, (s, n) in sorted(self.class_sums.items())},
            "instances": self.instances,
            "teacher_instances": sum(n for _, n in self.teacher_sums.values()),
            "images": self.images, "skipped": self.skipped,
        }
