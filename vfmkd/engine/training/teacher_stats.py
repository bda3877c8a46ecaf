"""Per-channel statistics of the teachers' maps for ``distillation.standardize``: each cache holds the
ones it measured when it was written; a teacher without them (live only, or an older cache) measures
its own on a few training images."""
from __future__ import annotations

import logging
from typing import Any, Callable

from vfmkd.distillation.online_distiller import measure_channel_stats


def set_teacher_stats(router: Any, distiller: Any, plain_loader: Callable[[], Any], log: logging.Logger) -> None:
    """Hand the distiller each teacher's (mean, std) per distilled feature. ``plain_loader()``: a loader
    of training images without cached targets, built only when a live teacher must measure."""
    for name, src in router.sources.items():
        stats = dict(src.cache.stats) if src.cache is not None else {}
        used = distiller.features_used(name)
        missing = [f for f in used if f not in stats]
        if missing and src.live is not None:
            stats.update(measure_channel_stats(src.live, plain_loader()))
            log.info("teacher %s: per-channel stats of %s measured on up to 32 training images", name, missing)
        for feature in used:
            if feature in stats:
                distiller.set_teacher_stats(name, feature, *stats[feature])
            else:
                log.warning("teacher %s: no per-channel stats for %s (older cache): not standardised", name, feature)
