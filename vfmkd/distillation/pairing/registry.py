"""The pairing registry: (output loss, teacher kind, student head task) -> how the teacher's output
meets the head's output.

Teacher kinds: :data:`MASKS` (a teacher type whose class ``can_segment``: box-prompted mask logits,
SAM family; the list is the TEACHERS registry's, :func:`mask_teacher_types`) and :data:`HEADS` (a
trained vfmkd model as teacher: the raw outputs of its heads). A pairing function takes the term's
:class:`~vfmkd.distillation.pairing.output_pairs.OutputPairing` (its rule, the student head, the
class -> channel table, the loss's mode), the head's output, the :class:`Batch` and the teacher's
:class:`TeacherTargets`, and returns the loss's ``(args, kwargs)`` or None when nothing pairs this
step. A new output loss registers its pairings next to its class (``@register_pairing(...)``);
the built-in ones live in :mod:`~vfmkd.distillation.pairing.mask_pairs` and
:mod:`~vfmkd.distillation.pairing.head_pairs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from vfmkd.core.registry import TEACHERS

MASKS = "masks"
HEADS = "heads"
#: ``pair(pairing, output, batch, target) -> (args, kwargs) | None``
PairFn = Callable[..., Optional[Tuple[tuple, dict]]]
#: ``channels(table, head, where=, loss=, head_name=, teacher=) -> [channel per detection class]``
ChannelFn = Callable[..., List[int]]


@dataclass(frozen=True)
class PairingSpec:
    """One registered pairing. ``channels``: for pairings that read box-prompted masks by class
    (semantic/binary heads), how the dataset's class table for the head's task (detection class id
    -> the head's logit channel, -1: none) is checked and fitted to the head; None when the pairing
    needs no table."""

    loss: str
    teacher_kind: str
    task: str
    pair: PairFn
    channels: Optional[ChannelFn] = None


PAIRINGS: Dict[Tuple[str, str, str], PairingSpec] = {}


def register_pairing(loss: str, teacher_kind: str, tasks: Iterable[str],
                     channels: Optional[ChannelFn] = None) -> Callable[[PairFn], PairFn]:
    """Registers the decorated pairing function for ``loss`` with a teacher of ``teacher_kind`` on
    heads of each of ``tasks``."""
    def decorator(fn: PairFn) -> PairFn:
        for task in tasks:
            key = (loss, teacher_kind, task)
            if key in PAIRINGS:
                raise ValueError(f"pairing {key} is registered twice ({PAIRINGS[key].pair} and {fn})")
            PAIRINGS[key] = PairingSpec(loss, teacher_kind, task, fn, channels)
        return fn
    return decorator


def pairing_spec(loss: str, teacher_kind: str, task: str) -> PairingSpec:
    """The registered pairing (a ValueError naming what is registered for ``loss`` when there is none)."""
    key = (loss, teacher_kind, task)
    if key not in PAIRINGS:
        known = sorted(k[1:] for k in PAIRINGS if k[0] == loss)
        raise ValueError(f"no pairing registered for {key}; {loss} has {known or 'none'}")
    return PAIRINGS[key]


def served_tasks(loss: str, teacher_kind: str) -> Tuple[str, ...]:
    """The head tasks ``loss`` pairs with a teacher of ``teacher_kind``, in registration order."""
    return tuple(task for (name, kind, task) in PAIRINGS if name == loss and kind == teacher_kind)


def mask_teacher_types() -> Sequence[str]:
    """Registered teacher types whose class can be prompted for mask logits (``can_segment``), in
    registration order."""
    return [name for name, obj in TEACHERS.items() if isinstance(obj, type) and getattr(obj, "can_segment", False)]
