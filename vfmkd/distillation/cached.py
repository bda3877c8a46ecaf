"""Cached teacher targets attached to dataset samples inside the DataLoader workers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from vfmkd.datasets.records import Batch, Sample, collate_samples
from vfmkd.distillation.offline_distiller import OfflineTeacher
from vfmkd.distillation.targets import TeacherTargets, from_cache_entry


@dataclass
class DistillBatch:
    """A :class:`Batch` and, per cached teacher whose cache holds every image of it, the cached
    :class:`TeacherTargets` (B, ...) of those images (the flipped pass for mirrored views)."""

    batch: Batch
    cached: Dict[str, TeacherTargets] = field(default_factory=dict)


class CachedTargetsDataset(Dataset):
    """Wraps a dataset: ``[i]`` -> ``(sample, {teacher: targets or None})``; ``None`` for an image
    absent from that teacher's cache (``missing[teacher]``). Entries are read untouched (int8 stays
    int8) in the worker that loads the sample; the training step moves and decodes them. A cache with
    mask logits (``OfflineTeacher.has_masks``) adds the image's :class:`MaskLogits` (all its label
    rows, of the pass read: the flip pass for a mirrored view when cached)."""

    def __init__(self, dataset: Dataset, caches: Mapping[str, OfflineTeacher],
                 missing: Optional[Mapping[str, FrozenSet[str]]] = None) -> None:
        self.dataset = dataset
        self.caches = dict(caches)
        self.missing = {name: frozenset((missing or {}).get(name, ())) for name in self.caches}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]

    @property
    def augment(self):  # the loader re-creates workers per epoch for augmenting datasets
        return getattr(self.dataset, "augment", None)

    def __getitem__(self, index: int) -> Tuple[Sample, Dict[str, Optional[TeacherTargets]]]:
        sample: Sample = self.dataset[index]
        return sample, self._targets(sample)

    def __getitems__(self, indices: Sequence[int]) -> List[Tuple[Sample, Dict[str, Optional[TeacherTargets]]]]:
        """A batch (the DataLoader's batched fetch), the same items as ``[self[i] for i in indices]``: as each
        sample is loaded its cached targets are asked of the OS (:meth:`FeatureCacheReader.will_need`), so
        on a cold page cache the batch's reads run together, and while the next images decode; they are
        read once every sample is loaded."""
        samples: List[Sample] = []
        for index in indices:
            samples.append(self.dataset[index])
            for name, cache in self.caches.items():
                if samples[-1].image_id not in self.missing[name]:
                    cache.reader.will_need(samples[-1].image_id, samples[-1].view.flipped and cache.has_flip)
        return [(sample, self._targets(sample)) for sample in samples]

    def _targets(self, sample: Sample) -> Dict[str, Optional[TeacherTargets]]:
        cached: Dict[str, Optional[TeacherTargets]] = {}
        for name, cache in self.caches.items():
            if sample.image_id in self.missing[name]:
                cached[name] = None
                continue
            flipped = sample.view.flipped and cache.has_flip
            entry = cache.reader.read(sample.image_id, flipped=flipped, dequantize=False)
            if not cache.has_masks:  # a cache whose mask logits are still being added: features only
                entry.pop("masks", None)
            cached[name] = from_cache_entry(entry)
        return cached


def collate_distill(items: Sequence[Tuple[Sample, Mapping[str, Optional[TeacherTargets]]]]) -> DistillBatch:
    """Collate ``(sample, cached)`` pairs; a teacher with any image missing from its cache is left
    out of ``cached`` for this batch (the router sends that batch to the live teacher). Mask logits
    are concatenated with ``batch_idx`` = the image's position in the batch."""
    batch = collate_samples([s for s, _ in items])
    cached: Dict[str, TeacherTargets] = {}
    for name in items[0][1] if items else ():
        entries: List[Optional[TeacherTargets]] = [c[name] for _, c in items]
        if all(e is not None for e in entries):
            cached[name] = TeacherTargets.collate(entries)  # type: ignore[arg-type]
    return DistillBatch(batch, cached)
