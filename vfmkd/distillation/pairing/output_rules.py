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
panoptic_   mask_distill    masks: each box's prompt mask matched to one query of its image (Hungarian,
query                       :mod:`~vfmkd.distillation.pairing.query_pairs`) -> that query's mask logits vs
                            the teacher mask confined to its box, weight = the teacher's valid region.
panoptic_   kl_divergence   masks: the matched query's class logits (C + 1, no-object last) vs the box's
query                       class at SAM's confidence q (1 - q on no-object), softmax KL x T^2.
==========  ==============  ===========================================================================

Everything else is refused when the losses are built (:func:`resolve_output_term`; a loss class
may word its own refusal with a ``pairing_refusal`` classmethod, see ``OutputDistillLoss``).

The rows are the pairing registry (:mod:`vfmkd.distillation.pairing.registry`, keyed by (loss,
teacher kind, task)); the functions are :mod:`vfmkd.distillation.pairing.mask_pairs` (teacher kind
"masks") and :mod:`vfmkd.distillation.pairing.head_pairs` (teacher kind "heads"), run by
:class:`~vfmkd.distillation.pairing.output_pairs.OutputPairing`. Which vfmkd teacher head can teach
a student head is the student task's ``teacher_tasks`` (:mod:`vfmkd.tasks`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.pairing.registry import HEADS, MASKS, mask_teacher_types, served_tasks
from vfmkd.tasks import Task, get_task, task_of


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
    """How one output term pairs: ``source``, the teacher kind, "masks" (teacher mask logits) or
    "heads" (the vfmkd teacher's ``teacher_head``)."""

    loss: str
    task: str
    source: str
    teacher_head: str = ""


def teaches(teacher: TeacherOutputs, task: Task) -> bool:
    """Some head of the (vfmkd) teacher can teach a head of ``task``."""
    return any(t in task.teacher_tasks for t, _ in teacher.heads.values())


def segmenting_teachers_hint(teachers: Mapping[str, TeacherOutputs], task: str) -> str:
    """'types sam, lora_sam, sam2 or a vfmkd teacher with a <task> head' plus which of this run's
    teachers qualify."""
    mine = [t.name for t in teachers.values() if t.can_segment or teaches(t, get_task(task))]
    here = f" (in this run: {', '.join(sorted(mine))})" if mine else " (none in this run)"
    article = "an" if task[0] in "aeiou" else "a"
    return f"teachers of type {', '.join(mask_teacher_types())} or a vfmkd teacher with {article} {task} head{here}"


def output_head(where: str, loss: str, head: Optional[str], teacher: TeacherOutputs, model: Any) -> str:
    """The student head an output term reads: ``head:``, else the only head whose task the teacher
    serves for this loss."""
    if head is not None:
        if head not in model.heads:
            raise ConfigError(f"{where}: the model has no head '{head}' (heads: {list(model.heads)})")
        return head
    tasks = {n: task_of(h) for n, h in model.heads.items()}
    by_masks, by_heads = served_tasks(loss, MASKS), served_tasks(loss, HEADS)
    fits = [n for n, task in tasks.items()
            if (teacher.can_segment and task.name in by_masks) or (task.name in by_heads and teaches(teacher, task))]
    if not fits:  # the teacher serves none: the head the loss could read at all, so the resolver says why
        fits = [n for n, task in tasks.items() if task.name in by_masks + by_heads]
        fits = fits if len(fits) == 1 else list(model.heads) if len(model.heads) == 1 else []
    if len(fits) == 1:
        return fits[0]
    choices = ("candidates: " + ", ".join(fits) if fits
               else "heads: " + ", ".join(f"{n} ({t.name})" for n, t in tasks.items()))
    raise ConfigError(f"{where}: set 'head:' to the student head {loss} distils ({choices})")


def resolve_output_term(loss: str, where: str, head: str, task: str, num_classes: int,
                        teacher: TeacherOutputs, teachers: Mapping[str, TeacherOutputs],
                        teacher_head: Optional[str] = None) -> OutputRule:
    """The pairing of output loss ``loss`` on student head ``head`` (``task``, ``num_classes``) with
    ``teacher``, or a :class:`ConfigError` saying which teachers could serve it.

    A vfmkd teacher's head serves when the student task names its task (``Task.teacher_tasks``) and
    it has the student head's number of classes; ``teacher_head`` picks one by name (default: the
    head of the student head's name if it fits, else the only fitting one)."""
    taught_by = get_task(task).teacher_tasks
    fitting = {n: (t, k) for n, (t, k) in teacher.heads.items() if t in taught_by}
    if teacher_head is not None:
        if teacher_head not in teacher.heads:
            raise ConfigError(f"{where}: teacher '{teacher.name}' has heads {sorted(teacher.heads)}, not "
                              f"'{teacher_head}'")
        if teacher_head not in fitting:
            raise ConfigError(f"{where}: teacher head '{teacher_head}' is a {teacher.heads[teacher_head][0]} head; the "
                              f"student head '{head}' ({task}) needs one of task {'/'.join(taught_by)}")
        fitting = {teacher_head: fitting[teacher_head]}
    by_masks, by_heads = served_tasks(loss, MASKS), served_tasks(loss, HEADS)
    if fitting and task in by_heads:
        return OutputRule(loss, task, HEADS, heads_teacher_head(where, head, task, num_classes, teacher, fitting))
    if teacher.can_segment and task in by_masks:
        return OutputRule(loss, task, MASKS)
    refusal = getattr(LOSSES.get(loss), "pairing_refusal", None) if loss in LOSSES else None
    reason = None if refusal is None else refusal(where, head, get_task(task), num_classes, teacher,
                                                  task in by_heads and task not in by_masks)
    if reason is not None:
        raise ConfigError(reason)
    if task not in (by_masks + by_heads):
        raise ConfigError(f"{where}: {loss} does not apply to a {task} head ('{head}')")
    if task in by_masks:
        raise ConfigError(
            f"{where}: {loss} on the {task} head '{head}' needs a teacher that can segment (box-prompted mask logits) "
            f"or predicts {task} outputs, and teacher '{teacher.name}' ({teacher.type}) cannot. Teachers that can: "
            f"{segmenting_teachers_hint(teachers, task)}; set 'teacher:' to one of them.")
    raise ConfigError(
        f"{where}: {loss} on the {task} head '{head}' needs a vfmkd teacher (type: vfmkd) with a {task} head of the "
        f"same {num_classes} classes; teacher '{teacher.name}' ({teacher.type}) has none.")


def heads_teacher_head(where: str, head: str, task: str, num_classes: int, teacher: TeacherOutputs,
                       fitting: Mapping[str, Tuple[str, int]]) -> str:
    """The vfmkd teacher's head that teaches student head ``head``: the one of its name, else the
    only fitting one; it must predict the same number of classes."""
    name = head if head in fitting else (next(iter(fitting)) if len(fitting) == 1 else None)
    if name is None:
        raise ConfigError(f"{where}: teacher '{teacher.name}' has several {task} heads {sorted(fitting)}; "
                          f"name one with teacher_head: <name>")
    classes = fitting[name][1]
    if classes != num_classes:
        raise ConfigError(f"{where}: teacher '{teacher.name}' head '{name}' predicts {classes} classes, the "
                          f"student head '{head}' {num_classes}; output distillation needs the same classes (train "
                          f"the teacher on the student's dataset, or use a feature loss)")
    return name

