"""Output pairings with a mask teacher (SAM family, rule source "masks"): box-prompted teacher mask
logits vs an instance head's masks, a semantic/binary head's class channels (mask_distill), a binary
head's per-pixel distribution (kl_divergence) and image-level class scores (cls_distill), each
registered under (loss, "masks", task) in :mod:`vfmkd.distillation.pairing.registry`."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import Batch
from vfmkd.distillation.pairing.mask_grid import (
    BACKGROUND_LOGIT,
    box_cells,
    class_union,
    content_cells,
    image_valid_on_grid,
    prompts_on_grid,
    student_affine_of,
)
from vfmkd.distillation.pairing.registry import MASKS, register_pairing
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.tasks import task_of


def instance_mask_pair(head: Any, output: Any, batch: Batch, target: TeacherTargets
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """mask_distill on an instance head with a mask teacher -> (student (1, M, h, w), teacher
    (1, M, h, w), weight (1, M, h, w)) on the prototype grid, or None when nothing pairs."""
    read = task_of(head).read_output(output)
    grid_hw = tuple(read.proto.shape[-2:])
    stride = batch.images.shape[-1] // grid_hw[1]
    prompts = prompts_on_grid(batch, target, grid_hw, stride, read.proto.device)
    if prompts is None or len(prompts.rows) == 0:
        return None
    anchors = head.match_anchors(output, prompts.boxes, prompts.cls, prompts.batch_idx)
    student = read.mask_logits(anchors, prompts.batch_idx)
    weight = box_cells(prompts.boxes, grid_hw, stride).float() * prompts.valid
    return student[None], prompts.logits[None], weight[None]


def class_channels(cls: torch.Tensor, channel_of_class: torch.Tensor) -> torch.Tensor:
    """Detection class ids (M,) -> the student's logit channel (M,) (-1: the class has none)."""
    table = channel_of_class.to(cls.device)
    ok = (cls >= 0) & (cls < len(table))
    out = torch.full_like(cls, -1)
    out[ok] = table[cls[ok]]
    return out


def class_union_pairs(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                      ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per (image, channel) present in the prompts: (student (G, H, W) logits of that channel,
    teacher union (G, H, W), box union (G, H, W) bool, valid (G, H, W) float, keys (G, 2) =
    (image, channel)); None when the teacher has no masks or no prompt maps to a channel."""
    grid_hw = tuple(logits.shape[-2:])
    stride = batch.images.shape[-1] // grid_hw[1]
    prompts = prompts_on_grid(batch, target, grid_hw, stride, logits.device)
    if prompts is None:
        return None
    channel = class_channels(prompts.cls, channel_of_class)
    keep = channel >= 0
    if not bool(keep.any()):
        return None
    num_ch = logits.shape[1]
    key = prompts.batch_idx[keep] * num_ch + channel[keep]
    groups, group_of = torch.unique(key, return_inverse=True)
    inside = box_cells(prompts.boxes[keep], grid_hw, stride)
    union, boxes = class_union(prompts.logits[keep], inside, group_of, len(groups))
    valid = torch.zeros(len(groups), *grid_hw, device=logits.device).scatter_reduce(
        0, group_of.view(-1, 1, 1).expand(-1, *grid_hw), prompts.valid[keep], reduce="amax", include_self=True)
    img, ch = groups // num_ch, groups % num_ch
    return logits[img, ch], union, boxes, valid, torch.stack([img, ch], 1)


def class_mask_pair(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """mask_distill on a semantic/binary head with a mask teacher -> (student (1, G, H, W), teacher
    union (1, G, H, W), weight (1, G, H, W) = union of the class's boxes x valid)."""
    found = class_union_pairs(logits, batch, target, channel_of_class)
    if found is None:
        return None
    student, union, boxes, valid, _ = found
    return student[None], union[None], (boxes.float() * valid)[None]


def as_two_class(logits: torch.Tensor) -> torch.Tensor:
    """(...,) foreground logits -> (..., 2) rows ``[0, logit]``: softmax over them is (1 - p, p)
    with p = sigmoid(logit), so a 2-class KL is exactly the Bernoulli KL."""
    return torch.stack([torch.zeros_like(logits), logits], dim=-1)


def binary_kl_pair(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """kl_divergence on a binary head with a mask teacher -> (student (P, 2), teacher (P, 2),
    weight (P,)) over every cell of every image (P = B*H*W): the teacher is the union of the
    foreground classes' masks (each within its box), :data:`BACKGROUND_LOGIT` elsewhere; weight =
    the teacher's valid region. None when the teacher has no masks this step."""
    teacher = class_union_maps(logits, batch, target, channel_of_class)
    if teacher is None:
        return None
    h, w = logits.shape[-2:]
    stride = batch.images.shape[-1] // w
    valid = image_valid_on_grid(target, student_affine_of(target, batch), (h, w), stride).to(logits.device)
    return as_two_class(logits[:, 0].reshape(-1)), as_two_class(teacher[:, 0].reshape(-1)), valid.reshape(-1)


def class_union_maps(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor
                     ) -> Optional[torch.Tensor]:
    """The teacher as a semantic/binary head of logits (B, K, H, W) sees it: (B, K, H, W) logits, each
    channel the union of its classes' box-prompted masks (each within its box), :data:`BACKGROUND_LOGIT`
    elsewhere (what kl_divergence distils, and what the pictures draw). None when the teacher has no
    masks this step."""
    if target.mask_logits is None:
        return None
    maps = torch.full(logits.shape, BACKGROUND_LOGIT, device=logits.device)
    found = class_union_pairs(logits, batch, target, channel_of_class)
    if found is not None:
        _, union, _, _, keys = found
        maps[keys[:, 0], keys[:, 1]] = union.to(maps.dtype)
    return maps


def image_class_pair(logits: torch.Tensor, batch: Batch, target: TeacherTargets, channel_of_class: torch.Tensor,
                     mode: str) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """cls_distill on a semantic/binary head with a mask teacher: image-level scores of the thing
    channels (those some detection class maps to). Student: max over the image content of the
    channel's logits; teacher: max of the class's union inside its boxes, :data:`BACKGROUND_LOGIT`
    when the image has no box of the class. ``sigmoid`` mode -> ((N, 1), (N, 1), None) rows per
    (image, thing channel); ``softmax`` -> ((B, K_thing), (B, K_thing), None)."""
    if target.mask_logits is None:
        return None
    b, k, h, w = logits.shape
    stride = batch.images.shape[-1] // w
    things = torch.unique(channel_of_class[channel_of_class >= 0]).to(logits.device)
    if len(things) == 0:
        return None
    inside = content_cells(batch, (h, w), stride, logits.device)  # (B, H, W)
    pooled = logits.masked_fill(~inside[:, None], float("-inf")).amax(dim=(2, 3))  # (B, K)
    teacher = torch.full((b, k), BACKGROUND_LOGIT, device=logits.device)
    found = class_union_pairs(logits, batch, target, channel_of_class)
    if found is not None:
        _, union, boxes, valid, keys = found
        score = union.masked_fill(~(boxes & (valid > 0)), BACKGROUND_LOGIT).amax(dim=(1, 2))
        teacher[keys[:, 0], keys[:, 1]] = score
    student, teacher = pooled[:, things], teacher[:, things]
    if mode == "softmax":
        return student, teacher, None
    return student.reshape(-1, 1), teacher.reshape(-1, 1), None



# ------------------------------------------------------------------ the class tables of semantic/binary heads
def semantic_channels(table: Sequence[int], head: Any, **_: Any) -> List[int]:
    """A semantic head's class table: channels beyond the head's ``num_classes`` become -1."""
    k = int(getattr(head, "num_classes", 0))
    return [c if c < k else -1 for c in table]


def binary_channels(table: Sequence[int], head: Any, where: str = "", teacher: str = "", **_: Any) -> List[int]:
    """A binary head's class table, refused when no detection class is a foreground class."""
    if not any(c >= 0 for c in table):
        raise ConfigError(f"{where}: none of data.binary_classes is a detection class, so {teacher} is "
                          "never prompted for the binary foreground; name detection classes (e.g. [person])")
    return list(table)


# ------------------------------------------------------------------ the registered pairings (teacher kind "masks")
@register_pairing("mask_distill", MASKS, ["instance"])
def instance_masks(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
    pair = instance_mask_pair(p.head, output, batch, target)
    return None if pair is None else (pair, {})


@register_pairing("mask_distill", MASKS, ["semantic"], channels=semantic_channels)
@register_pairing("mask_distill", MASKS, ["binary"], channels=binary_channels)
def class_masks(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
    pair = class_mask_pair(p.read(output).logits, batch, target, p.channel_of_class)
    return None if pair is None else (pair, {})


@register_pairing("kl_divergence", MASKS, ["binary"], channels=binary_channels)
def binary_distribution(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
    pair = binary_kl_pair(p.read(output).logits, batch, target, p.channel_of_class)
    return None if pair is None else (pair, {})


@register_pairing("cls_distill", MASKS, ["semantic"], channels=semantic_channels)
@register_pairing("cls_distill", MASKS, ["binary"], channels=binary_channels)
def image_class_scores(p: Any, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
    found = image_class_pair(p.read(output).logits, batch, target, p.channel_of_class, p.mode)
    return None if found is None else ((found[0], found[1]), {})
