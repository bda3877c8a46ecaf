"""Pairing of the promptable student (``sam_decoder`` head) with a SAM-family teacher: EdgeSAM's recipe.

==================  ===========================================================================================
loss                pairing
==================  ===========================================================================================
embedding_distill   the head's image embeddings (B, 256, S/16, S/16) vs the teacher's 256-wide stride-16 map
                    (SAM ``image_embeddings``, cached or live) carried onto the same grid by the feature geometry
                    (:func:`~vfmkd.distillation.geometry.resample_to_student`); cells outside the teacher's
                    valid (unpadded) region are masked out. Any teacher with such a map (sam, lora_sam, sam2).
prompt_distill      every detection box of the view whose teacher mask exists (``MaskLogits`` matched by image
                    and ``label_index``), in canvas xyxy pixels, prompts the student decoder
                    (``head.decode``); its low-res logits (S/4) meet the teacher's logits of that box on the
                    same S/4 grid (:func:`~vfmkd.distillation.pairing.mask_grid.masks_on_grid`). With ``points`` > 0
                    each box also gives a point prompt: that many foreground points sampled inside the
                    ground-truth instance mask of the box (``batch.instances``, matched by ``label_index``)
                    or else inside the teacher's mask, the box's teacher mask as target. Each of the
                    ``refine_iters`` rounds re-prompts every set with one more point sampled from the error
                    region of its previous prediction (label 1 where the teacher says foreground, else 0)
                    and the previous logits (detached) as ``mask_input``. All rounds are concatenated into
                    one (M, S/4, S/4) student / teacher / weight triple (weight = the teacher's valid
                    region). Needs a teacher with box-prompted mask logits (sam, lora_sam, sam2).
==================  ===========================================================================================

Everything else is refused when the losses are built (:func:`build_embedding_term`,
:func:`build_prompt_term`: the build hooks of the two losses). A promptable head is one whose task's
output is :class:`~vfmkd.tasks.PromptableOutput` (embeddings a prompted decoder reads).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.pairing.mask_grid import match_rows, prompts_on_grid, student_affine_of
from vfmkd.distillation.pairing.registry import mask_teacher_types
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.distillation.terms import LossEntry, LossTerm, TermContext
from vfmkd.tasks import PromptableOutput, task_of

#: SAM's embedding width and stride: what the decoder reads.
EMBED_STRIDE = 16


# ---------------------------------------------------------------------------------------- building
def promptable_head(where: str, kind_name: str, head: Optional[str], model: Any) -> str:
    """The ``sam_decoder`` head a promptable term reads: ``head:``, else the only promptable head."""
    tasks = {n: task_of(h) for n, h in model.heads.items()}
    fits = [n for n, t in tasks.items() if issubclass(t.output_type, PromptableOutput)]
    if head is None:
        if len(fits) != 1:
            raise ConfigError(f"{where}: {kind_name} trains a promptable head (type: sam_decoder); "
                              + (f"set 'head:' to one of {fits}" if fits else
                                 "the model has none (heads: "
                                 f"{', '.join(f'{n} ({t.name})' for n, t in tasks.items())})"))
        return fits[0]
    if head not in model.heads:
        raise ConfigError(f"{where}: the model has no head '{head}' (heads: {list(model.heads)})")
    if head not in fits:
        raise ConfigError(f"{where}: {kind_name} trains a promptable head (type: sam_decoder); '{head}' is a "
                          f"{tasks[head].name} head" + (f" (promptable heads: {', '.join(fits)})" if fits else ""))
    return head


def embedding_feature(where: str, teacher: str, t_specs: Sequence[FeatureSpec], primary: str, width: int,
                      wanted: Optional[str]) -> str:
    """The teacher map embedding_distill reads: ``wanted``, else the primary map if it is ``width``
    wide at stride 16, else the only such map; a :class:`ConfigError` when none fits."""
    by_name = {s.name: s for s in t_specs}
    fits = [s.name for s in t_specs if s.channels == width and s.stride == EMBED_STRIDE]
    offered = ", ".join(f"{s.name} ({s.channels} ch, stride {s.stride})" for s in t_specs)
    if wanted is not None:
        if wanted not in by_name:
            raise ConfigError(f"{where}: teacher '{teacher}' provides {offered}, not '{wanted}'")
        spec = by_name[wanted]
        if spec.channels != width or spec.stride != EMBED_STRIDE:
            raise ConfigError(f"{where}: teacher map '{wanted}' is {spec.channels} wide at stride {spec.stride}; the "
                              f"promptable head's embeddings are {width} wide at stride 16 (SAM's image_embeddings)")
        return wanted
    if primary in fits:
        return primary
    if len(fits) == 1:
        return fits[0]
    raise ConfigError(
        f"{where}: embedding_distill needs a teacher map {width} wide at stride 16 (SAM's image_embeddings, SAM2's "
        f"fpn_s16): teacher '{teacher}' provides {offered}"
        + (
            "; name one with teacher_feature: <name>"
            if fits
            else f"; use a teacher of type {', '.join(mask_teacher_types())}"
        )
    )


def promptable_teacher(entry: LossEntry, context: TermContext) -> Tuple[str, str, Any]:
    """(teacher name, head name, head module) of an ``embedding_distill`` / ``prompt_distill`` entry."""
    teacher = context.output_teacher(entry)
    head = promptable_head(entry.where, entry.type, entry.kwargs.pop("head", None), context.model)
    return teacher, head, context.model.heads[head]


def build_embedding_term(entry: LossEntry, context: TermContext) -> LossTerm:
    """An ``embedding_distill`` term: the head's embeddings vs the teacher's stride-16 map of that width."""
    teacher, head, head_module = promptable_teacher(entry, context)
    where, kwargs, specs = entry.where, entry.kwargs, context.teacher_specs
    if teacher not in specs:
        raise ConfigError(f"{where}: teacher '{teacher}' provides no feature maps here (enabled: {sorted(specs)})")
    kwargs["teacher_feature"] = embedding_feature(where, teacher, specs[teacher], context.primary.get(teacher, ""),
                                                  int(head_module.embed_dim), kwargs.get("teacher_feature"))
    module = LOSSES.build(entry.type, where=where, **kwargs)
    return entry.term("output", module, module.log_name, head, EmbeddingPairing(head_module, kwargs["teacher_feature"]))


def build_prompt_term(entry: LossEntry, context: TermContext) -> LossTerm:
    """A ``prompt_distill`` term: needs a teacher with box-prompted mask logits."""
    teacher, head, head_module = promptable_teacher(entry, context)
    offer = context.offers[teacher]
    if not offer.can_segment:
        can = sorted(n for n, t in context.offers.items() if t.can_segment)
        raise ConfigError(
            f"{entry.where}: prompt_distill distils the teacher's box-prompted mask logits, and teacher '{teacher}' "
            f"({offer.type}) gives none. Teachers that can: types {', '.join(mask_teacher_types())}"
            f"{' (in this run: ' + ', '.join(can) + ')' if can else ' (none in this run)'}; set 'teacher:' to one of "
            "them.")
    module = LOSSES.build(entry.type, where=entry.where, **entry.kwargs)
    return entry.term("output", module, module.log_name, head, PromptPairing(head_module, module))


# ---------------------------------------------------------------------------------------- pairing
class PromptPairingBase(ABC):
    """What the distiller asks of a pairing: ``pair(output, batch, target)`` -> ``(args, kwargs)``
    or None, ``needs_masks`` (the teacher's box-prompted masks are read) and ``needs_heads``."""

    needs_masks = False
    needs_heads = False

    @abstractmethod
    def pair(self, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
        """The loss's ``(args, kwargs)`` for this step, or None when nothing pairs."""

    def sampling_state(self) -> Dict[str, torch.Tensor]:
        """Random-generator states an exact resume restores (device -> state); none by default."""
        return {}

    def load_sampling_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} draws nothing, got generator states {sorted(state)}")


class EmbeddingPairing(PromptPairingBase):
    """embedding_distill: (student embeddings (B, C, h, w), teacher map on that grid, mask (B, 1, h, w))."""

    def __init__(self, head: Any, teacher_feature: str) -> None:
        self.head, self.teacher_feature = head, teacher_feature
        self.task = task_of(head)

    def pair(self, output: torch.Tensor, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
        if self.teacher_feature not in target.features:
            raise ValueError(f"embedding_distill: the teacher's targets hold {sorted(target.features)}, not "
                             f"'{self.teacher_feature}'")
        output = self.task.read_output(output).embeddings
        h, w = output.shape[-2:]
        stride = batch.images.shape[-1] // w
        teacher_map, mask = resample_to_student(
            target.feature(self.teacher_feature, output.device), target.affine, target.valid_hw,
            (target.input_size, target.input_size), student_affine_of(target, batch), (h, w), stride)
        return (output, teacher_map.to(output.device), mask.to(output.device)), {}


@dataclass
class PromptSet:
    """One group of prompt sets decoded together: ``rows`` index the paired prompts; ``boxes``
    (n, 4) or None; ``points`` (n, P, 2) / ``labels`` (n, P) or None; ``logits`` the last prediction."""

    rows: torch.Tensor
    boxes: Optional[torch.Tensor]
    points: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


def sample_cells(region: torch.Tensor, k: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``k`` distinct random cells of each row's ``region`` (M, H, W) bool -> (flat indices (M, k),
    ok (M,): the row had at least ``k`` cells)."""
    m = region.shape[0]
    score = torch.rand(region.shape, generator=generator, device=region.device).view(m, -1)
    score = score.masked_fill(~region.view(m, -1), -1.0)
    top, idx = score.topk(k, dim=1)
    return idx, top[:, -1] >= 0 if k else torch.ones(m, dtype=torch.bool, device=region.device)


def cells_to_points(flat: torch.Tensor, grid_w: int, stride: float) -> torch.Tensor:
    """Flat cell indices (...,) -> (..., 2) x, y canvas pixels of the cell centres."""
    ys, xs = flat // grid_w, flat % grid_w
    return torch.stack([(xs.float() + 0.5) * stride, (ys.float() + 0.5) * stride], dim=-1)


def error_region(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Where the next corrective point is drawn: cells the prediction gets wrong (inside the valid
    region); a row without errors falls back to its target foreground, then to its valid region."""
    err = ((pred > 0) ^ target) & valid
    fg = target & valid
    has_err = err.flatten(1).any(1)[:, None, None]
    has_fg = fg.flatten(1).any(1)[:, None, None]
    return torch.where(has_err, err, torch.where(has_fg, fg, valid))


class PromptPairing(PromptPairingBase):
    """prompt_distill: box, point and refinement prompts through ``head.decode``, see the module table."""

    needs_masks = True

    def __init__(self, head: Any, loss: Any) -> None:
        self.head, self.task = head, task_of(head)
        self.points, self.refine_iters, self.seed = int(loss.points), int(loss.refine_iters), int(loss.seed)
        self._generators: Dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def sampling_state(self) -> Dict[str, torch.Tensor]:
        """The point generators' states (one per device), so a resumed run draws the same prompts."""
        return {key: gen.get_state() for key, gen in self._generators.items()}

    def load_sampling_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.generator(torch.device(key)).set_state(value)

    def point_regions(self, batch: Batch, idx: torch.Tensor, label_index: torch.Tensor, teacher_fg: torch.Tensor,
                      grid_hw: Tuple[int, int]) -> torch.Tensor:
        """(M, H, W) bool where point prompts are drawn: the ground-truth instance mask of each box
        when the batch has one (same image and ``label_index``, not empty), else the teacher's mask."""
        region = teacher_fg.clone()
        inst = batch.instances
        if inst is None or len(inst.label_index) == 0 or tuple(inst.masks.shape[-2:]) != tuple(grid_hw):
            return region
        ia, ib = match_rows(idx.cpu(), label_index.cpu(), inst.batch_idx.cpu(), inst.label_index.cpu())
        if len(ia):
            gt = inst.masks.to(region.device)[ib.to(region.device)] > 0.5
            ok = gt.flatten(1).any(1)
            rows = ia.to(region.device)[ok]
            region[rows] = gt[ok]
        return region

    def pair(self, output: torch.Tensor, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
        emb = self.task.read_output(output).embeddings
        h, w = emb.shape[-2:]
        grid_hw = (4 * h, 4 * w)
        stride = batch.images.shape[-1] // grid_hw[1]
        prompts = prompts_on_grid(batch, target, grid_hw, stride, emb.device)
        if prompts is None:
            return None
        keep = prompts.valid.flatten(1).any(1)
        if not bool(keep.any()):
            return None
        teacher, valid = prompts.logits[keep], prompts.valid[keep] > 0
        idx, boxes = prompts.batch_idx[keep], prompts.boxes[keep]
        label_index = batch.boxes.label_index.to(emb.device)[prompts.rows.to(emb.device)[keep]]
        target_fg = (teacher > 0) & valid
        gen = self.generator(emb.device)

        sets: List[PromptSet] = [PromptSet(torch.arange(len(idx), device=emb.device), boxes)]
        if self.points > 0:
            region = self.point_regions(batch, idx, label_index, target_fg, grid_hw)
            flat, ok = sample_cells(region, self.points, gen)
            if bool(ok.any()):
                pts = cells_to_points(flat[ok], grid_hw[1], stride)
                sets.append(PromptSet(torch.nonzero(ok).view(-1), None, pts,
                                      torch.ones(pts.shape[:2], dtype=torch.int, device=emb.device)))
        students, targets, weights = [], [], []
        for round_ in range(1 + self.refine_iters):
            for s in sets:
                mask_input = None
                if round_ > 0:  # one corrective point from the error region, the last logits as mask_input
                    prev = s.logits.detach()
                    flat, _ = sample_cells(error_region(prev, target_fg[s.rows], valid[s.rows]), 1, gen)
                    label = target_fg[s.rows].flatten(1).gather(1, flat).int()
                    new = cells_to_points(flat, grid_hw[1], stride)
                    s.points = new if s.points is None else torch.cat([s.points, new], 1)
                    s.labels = label if s.labels is None else torch.cat([s.labels, label], 1)
                    mask_input = prev[:, None]
                low, _ = self.head.decode(emb, idx[s.rows], boxes=s.boxes, points=s.points, point_labels=s.labels,
                                          mask_input=mask_input)
                s.logits = low[:, 0]
                students.append(s.logits)
                targets.append(teacher[s.rows])
                weights.append(valid[s.rows].float())
        return (torch.cat(students), torch.cat(targets), torch.cat(weights)), {}
