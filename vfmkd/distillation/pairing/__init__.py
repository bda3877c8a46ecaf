"""Output pairings: how a teacher's output meets a student head's output for an output loss.

The registry (:mod:`~vfmkd.distillation.pairing.registry`) is keyed by (loss, teacher kind, task);
importing this package registers the built-in pairings (mask teachers: ``mask_pairs``, and ``query_pairs``
for query panoptic heads; vfmkd teachers: ``head_pairs``). ``output_rules`` resolves an entry's rule,
``output_pairs`` runs it, ``prompt_pairs`` pairs the promptable head, ``mask_grid`` carries teacher masks onto
a student grid.
"""
from vfmkd.distillation.pairing import head_pairs, mask_pairs, query_pairs  # noqa: F401  (register the built-in pairings)
