"""One output term's pairing at run time (:class:`OutputPairing`: its rule, resolved when the losses
are built by :func:`~vfmkd.distillation.pairing.output_rules.resolve_output_term`, run through the
function registered for (loss, teacher kind, task) in :mod:`vfmkd.distillation.pairing.registry`),
how an output loss builds its term (:func:`build_output_term`), and the build-time check that a
teacher's cache holds the mask logits its output terms read."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.datasets.records import Batch
from vfmkd.distillation.pairing.output_rules import OutputRule, output_head, resolve_output_term
from vfmkd.distillation.pairing.registry import MASKS, pairing_spec
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.distillation.terms import LossEntry, LossTerm, TermContext
from vfmkd.tasks import get_task


class OutputPairing:
    """One output term's pairing, resolved at build time: ``rule``, the student ``head`` module (a
    plain reference: the model owns it), and for pairings that read box-prompted masks by class
    (semantic/binary heads) ``channel_of_class`` (C_det,) int64: detection class id -> the head's
    logit channel (-1: none). ``pair(output, batch, target)`` -> the loss's ``(args, kwargs)``, or
    None when the teacher's targets hold nothing to pair this step."""

    def __init__(self, rule: OutputRule, head: Any, channel_of_class: Optional[Sequence[int]] = None,
                 mode: str = "sigmoid") -> None:
        self.rule, self.head, self.mode = rule, head, mode
        self.spec = pairing_spec(rule.loss, rule.source, rule.task)
        self.task = get_task(rule.task)
        self.channel_of_class = (
            None if channel_of_class is None else torch.as_tensor(list(channel_of_class), dtype=torch.long)
        )
        if self.spec.channels is not None and self.channel_of_class is None:
            raise ConfigError(f"{rule.loss} on a {rule.task} head from teacher masks needs the detection class -> "
                              f"{rule.task} channel table")

    @property
    def needs_masks(self) -> bool:
        return self.rule.source == MASKS

    def read(self, output: Any) -> Any:
        """A head output (the student's or the vfmkd teacher's) as the student task's typed output."""
        return self.task.read_output(output)

    def sampling_state(self) -> Dict[str, torch.Tensor]:
        """Random-generator states an exact resume restores: none (these pairings draw nothing)."""
        return {}

    def load_sampling_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.rule.loss}: this pairing draws nothing, got generator states {sorted(state)}")

    def pair(self, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
        return self.spec.pair(self, output, batch, target)


def build_output_term(entry: LossEntry, context: TermContext) -> LossTerm:
    """The term of an output loss entry (``teacher:``, ``head:``, ``teacher_head:``): the student
    head (default: the only head the teacher serves for this loss), the pairing registered for (loss,
    teacher kind, task) and, for pairings that read masks by class, the dataset's class table for
    the head's task (``context.class_channels``)."""
    where, kwargs, offers = entry.where, entry.kwargs, context.offers
    teacher = context.output_teacher(entry)
    head = output_head(where, entry.type, kwargs.pop("head", None), offers[teacher], context.model)
    head_module = context.model.heads[head]
    task = str(head_module.task)
    rule = resolve_output_term(entry.type, where, head, task, int(getattr(head_module, "num_classes", None) or 1),
                               offers[teacher], offers, kwargs.pop("teacher_head", None))
    fit_table = pairing_spec(rule.loss, rule.source, rule.task).channels
    channels = None
    if fit_table is not None:
        table = context.class_channels.get(task)
        if table is None:
            raise ConfigError(f"{where}: {entry.type} on the {task} head '{head}' from {teacher}'s box masks "
                              "needs the dataset's class tables (object_detection and semantic_segmentation "
                              "config.yaml)")
        channels = fit_table(table, head_module, where=where, teacher=teacher)
    module = LOSSES.build(entry.type, where=where, **kwargs)
    pairing = OutputPairing(rule, head_module, channels, getattr(module, "mode", "sigmoid"))
    return entry.term("output", module, module.log_name, head, pairing)


def check_mask_sources(distiller: Any, router: Any) -> None:
    """Every teacher whose mask logits an output term reads (``distiller.teachers_needing_masks()``)
    must have them in its cache when it has one (``router.sources[name].cache``); a cache written with
    ``--outputs features`` only (or not finished) is a :class:`ConfigError` naming the command that
    adds them (it reopens the file and fills the masks, resumably)."""
    for name in distiller.teachers_needing_masks():
        src = router.sources.get(name)
        cache = None if src is None else src.cache
        if cache is None or cache.reader.has_masks:
            continue
        terms = sorted(n for n, t in distiller.output_terms(active_only=False).items() if t.teacher == name
                       and getattr(t.pairing, "needs_masks", False))
        raise ConfigError(
            f"teachers.{name}: distillation.losses {', '.join(terms)} distil its box-prompted mask logits, but its "
            f"cache {cache.path} holds no mask logits (written with --outputs features, or the masks are unfinished). "
            "Add them (the tool reopens the file and fills the masks, resumably):\n  "
            f"{cache.reader.rebuild_command(masks=True)}")
