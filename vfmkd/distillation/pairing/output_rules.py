"""Output distillation: pair what a student head predicts with what a teacher predicts for the same thing.

A loss entry of kind ``output`` (``kl_divergence``, ``cls_distill``, ``mask_distill``) names a
``teacher`` and a student ``head``. What the teacher provides decides the pairing:

* **mask teachers** (``can_segment``: SAM, LoRA-SAM, SAM2) give box-prompted mask logits
  (:class:`~vfmkd.distillation.targets.MaskLogits`, one per detection-label box, on the teacher
  canvas at stride 4). They are carried onto the student head's grid by the feature geometry
  (:func:`~vfmkd.distillation.geometry.resample_to_student`: RoIAlign averages the logits each
  student cell covers; cells outside the teacher's valid region get weight 0).
* **vfmkd teachers** (a trained vfmkd model) give the raw training outputs of their heads on the
  student canvas (``TeacherTargets.head_outputs``), compared cell by cell / anchor by anchor.

Rules (student head task x loss x teacher), each returning the arguments of the loss module:

==========  ==============  ===========================================================================
task        loss            pairing
==========  ==============  ===========================================================================
instance    mask_distill    masks: every detection box of the view whose prompt mask exists (matched by
                            image and ``label_index``) -> the student mask of the anchor matched to that
                            box (``head.instance_mask_logits``, (N, S/4, S/4)) vs the teacher mask on
                            the same grid; weight = cells inside the box (centre rule, plus the cell
                            holding the box centre) and inside the teacher's valid region.
                            vfmkd: the same boxes through the same head rule on the teacher's output.
semantic    mask_distill    masks: per (image, class present in the prompts), the class's union (max) of
binary                      its masks, each confined to its own box
                            (:data:`~vfmkd.distillation.pairing.mask_grid.BACKGROUND_LOGIT` outside), vs the student
                            logit channel of that class (semantic: the class's semantic index; binary:
                            channel 0, classes in ``data.binary_classes`` only); weight = the union of that
                            class's boxes within the valid region.
                            vfmkd: every channel, per pixel, over the image content.
binary      kl_divergence   masks: per pixel of the valid image, Bernoulli KL at T (x T^2) between the
                            student logit and the teacher's foreground union (background = the floor
                            :data:`~vfmkd.distillation.pairing.mask_grid.BACKGROUND_LOGIT` where no foreground box is),
                            as 2-class softmax rows ``[0, logit]`` (softmax of those is exactly the sigmoid). vfmkd: the
                            teacher's binary logits.
semantic    kl_divergence   vfmkd: per pixel softmax KL over the classes, over the image content.
semantic    cls_distill     masks: image-level class scores: per (image, thing class) the max over the
binary                      image of the student logit vs the max of the teacher's union inside the
                            class's boxes (the floor when the image has no box of the class); classes
                            without a detection class (stuff, unlabeled) are not distilled.
                            vfmkd: per-pixel class scores (ultralytics' layout (B, K, H*W)).
detection   cls_distill     vfmkd: per anchor class scores (B, nc, A) vs the teacher head's ``scores``
instance    kl_divergence   (same anchors: the teacher sees the student canvas); kl: softmax per anchor.
==========  ==============  ===========================================================================

Everything else is refused when the losses are built (:func:`resolve_output_term`).

The pairings themselves: :mod:`vfmkd.distillation.pairing.mask_pairs` (source "masks"),
:mod:`vfmkd.distillation.pairing.head_pairs` (source "heads"), dispatched by
:class:`~vfmkd.distillation.pairing.output_pairs.OutputPairing`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from vfmkd.core.errors import ConfigError

#: The output losses and the student head tasks a mask teacher / a vfmkd teacher serves for each.
MASK_RULES: Dict[str, Tuple[str, ...]] = {
    "mask_distill": ("instance", "semantic", "binary"),
    "kl_divergence": ("binary",),
    "cls_distill": ("semantic", "binary"),
}
HEAD_RULES: Dict[str, Tuple[str, ...]] = {
    "mask_distill": ("instance", "semantic", "binary"),
    "kl_divergence": ("detection", "instance", "semantic", "binary"),
    "cls_distill": ("detection", "instance", "semantic", "binary"),
}
#: Which teacher head task can teach a student head task.
TEACHER_TASKS: Dict[str, Tuple[str, ...]] = {
    "detection": ("detection", "instance"),  # an instance head's scores are detection scores
    "instance": ("instance",),
    "semantic": ("semantic",),
    "binary": ("binary",),
}
MASK_TEACHER_TYPES = ("sam", "lora_sam", "sam2")


@dataclass(frozen=True)
class TeacherOutputs:
    """What one teacher can give output distillation, known when the losses are built.

    ``can_segment``: box-prompted mask logits (SAM family). ``heads``: a vfmkd teacher's heads,
    name -> (task, num_classes)."""

    name: str
    type: str
    can_segment: bool = False
    heads: Mapping[str, Tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputRule:
    """How one output term pairs: ``source`` "masks" (teacher mask logits) or "heads" (the vfmkd
    teacher's ``teacher_head``)."""

    loss: str
    task: str
    source: str
    teacher_head: str = ""


def segmenting_teachers_hint(teachers: Mapping[str, TeacherOutputs], task: str) -> str:
    """'types sam, lora_sam, sam2 or a vfmkd teacher with a <task> head' plus which of this run's
    teachers qualify."""
    mine = [t.name for t in teachers.values()
            if t.can_segment or any(k in TEACHER_TASKS[task] for k, _ in t.heads.values())]
    here = f" (in this run: {', '.join(sorted(mine))})" if mine else " (none in this run)"
    article = "an" if task[0] in "aeiou" else "a"
    return f"teachers of type {', '.join(MASK_TEACHER_TYPES)} or a vfmkd teacher with {article} {task} head{here}"


def resolve_output_term(loss: str, where: str, head: str, task: str, num_classes: int,
                        teacher: TeacherOutputs, teachers: Mapping[str, TeacherOutputs],
                        teacher_head: Optional[str] = None) -> OutputRule:
    """The pairing of output loss ``loss`` on student head ``head`` (``task``, ``num_classes``) with
    ``teacher``, or a :class:`ConfigError` saying which teachers could serve it.

    A vfmkd teacher's head serves when its task fits (:data:`TEACHER_TASKS`) and it has the student
    head's number of classes; ``teacher_head`` picks one by name (default: the head of the student
    head's name if it fits, else the only fitting one)."""
    fitting = {n: (t, k) for n, (t, k) in teacher.heads.items() if t in TEACHER_TASKS[task]}
    if teacher_head is not None:
        if teacher_head not in teacher.heads:
            raise ConfigError(f"{where}: teacher '{teacher.name}' has heads {sorted(teacher.heads)}, not "
                              f"'{teacher_head}'")
        if teacher_head not in fitting:
            raise ConfigError(f"{where}: teacher head '{teacher_head}' is a {teacher.heads[teacher_head][0]} head; the "
                              f"student head '{head}' ({task}) needs one of task {'/'.join(TEACHER_TASKS[task])}")
        fitting = {teacher_head: fitting[teacher_head]}
    if fitting and task in HEAD_RULES[loss]:
        name = head if head in fitting else (next(iter(fitting)) if len(fitting) == 1 else None)
        if name is None:
            raise ConfigError(f"{where}: teacher '{teacher.name}' has several {task} heads {sorted(fitting)}; "
                              f"name one with teacher_head: <name>")
        classes = fitting[name][1]
        if classes != num_classes:
            raise ConfigError(f"{where}: teacher '{teacher.name}' head '{name}' predicts {classes} classes, the "
                              f"student head '{head}' {num_classes}; output distillation needs the same classes (train "
                              f"the teacher on the student's dataset, or use a feature loss)")
        return OutputRule(loss, task, "heads", name)
    if teacher.can_segment and task in MASK_RULES[loss]:
        return OutputRule(loss, task, "masks")
    if loss == "cls_distill" and (teacher.can_segment or task in ("detection", "instance")):
        raise ConfigError(
            f"{where}: cls_distill on the {task} head '{head}' needs a teacher that provides class scores: a vfmkd "
            f"teacher (type: vfmkd, a trained vfmkd checkpoint) with a {task} head of the same {num_classes} classes; "
            f"teacher '{teacher.name}' ({teacher.type}) provides none"
            + (" (box-prompted masks are class-agnostic; its image-level class scores serve semantic and binary "
               "heads only)" if teacher.can_segment else ""))
    if loss == "kl_divergence" and teacher.can_segment:
        raise ConfigError(
            f"{where}: kl_divergence on the {task} head '{head}' needs the teacher's "
            f"{'per-pixel class' if task == 'semantic' else 'class'} distribution: a vfmkd teacher with a {task} head "
            f"of the same classes. Teacher '{teacher.name}' ({teacher.type}) gives class-agnostic box masks: use "
            f"mask_distill (all mask-capable heads) or kl_divergence on a binary head")
    if task not in (MASK_RULES[loss] + HEAD_RULES[loss]):
        raise ConfigError(f"{where}: {loss} does not apply to a {task} head ('{head}')")
    if task in MASK_RULES[loss]:
        raise ConfigError(
            f"{where}: {loss} on the {task} head '{head}' needs a teacher that can segment (box-prompted mask logits) "
            f"or predicts {task} outputs, and teacher '{teacher.name}' ({teacher.type}) cannot. Teachers that can: "
            f"{segmenting_teachers_hint(teachers, task)}; set 'teacher:' to one of them.")
    raise ConfigError(
        f"{where}: {loss} on the {task} head '{head}' needs a vfmkd teacher (type: vfmkd) with a {task} head of the "
        f"same {num_classes} classes; teacher '{teacher.name}' ({teacher.type}) has none.")

