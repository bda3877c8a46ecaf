"""One output term's pairing at run time (:class:`OutputPairing`: its rule, resolved when the losses
are built by :func:`~vfmkd.distillation.pairing.output_rules.resolve_output_term`, run through
:func:`~vfmkd.distillation.pairing.head_pairs.head_pair` or :func:`~vfmkd.distillation.pairing.mask_pairs.mask_pair`),
and the build-time check that a teacher's cache holds the mask logits its output terms read."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import Batch
from vfmkd.distillation.pairing.head_pairs import head_pair
from vfmkd.distillation.pairing.mask_pairs import mask_pair
from vfmkd.distillation.pairing.output_rules import OutputRule
from vfmkd.distillation.targets import TeacherTargets


class OutputPairing:
    """One output term's pairing, resolved at build time: ``rule``, the student ``head`` module (a
    plain reference: the model owns it), and for semantic/binary heads with a mask teacher
    ``channel_of_class`` (C_det,) int64: detection class id -> the head's logit channel (-1: none).
    ``pair(output, batch, target)`` -> the loss's ``(args, kwargs)``, or None when the teacher's
    targets hold nothing to pair this step."""

    def __init__(self, rule: OutputRule, head: Any, channel_of_class: Optional[Sequence[int]] = None,
                 mode: str = "sigmoid") -> None:
        self.rule, self.head, self.mode = rule, head, mode
        self.channel_of_class = (
            None if channel_of_class is None else torch.as_tensor(list(channel_of_class), dtype=torch.long)
        )
        if rule.source == "masks" and rule.task in ("semantic", "binary") and self.channel_of_class is None:
            raise ConfigError(f"{rule.loss} on a {rule.task} head from teacher masks needs the detection class -> "
                              f"{rule.task} channel table")

    @property
    def needs_masks(self) -> bool:
        return self.rule.source == "masks"

    def sampling_state(self) -> Dict[str, torch.Tensor]:
        """Random-generator states an exact resume restores: none (these pairings draw nothing)."""
        return {}

    def load_sampling_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.rule.loss}: this pairing draws nothing, got generator states {sorted(state)}")

    def pair(self, output: Any, batch: Batch, target: TeacherTargets) -> Optional[Tuple[tuple, dict]]:
        if self.rule.source == "heads":
            return head_pair(self.rule, self.head, output, batch, target, self.mode)
        return mask_pair(self.rule, self.head, output, batch, target, self.channel_of_class, self.mode)


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
