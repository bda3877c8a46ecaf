"""The standardisation of the teachers' maps (``distillation.standardize``): ``true`` / ``zscore``: per
channel (x - mean) / std; ``phi_s``: PHI-S (:mod:`vfmkd.cache.phi_s`), one rotation and one scale per
teacher map so every teacher's dimensions have variance 1; ``false``: raw maps. Each cache holds the
statistics it measured when it was written; a teacher without them (live only, or an older cache)
measures its own on a few training images (or, PHI-S of an older cache, on the cache's images)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable

from vfmkd.cache.codec import valid_cells
from vfmkd.cache.phi_s import CovarianceSum, PhiS, phi_s_from_moments, valid_vectors
from vfmkd.core.errors import ConfigError
from vfmkd.distillation.online_distiller import measure_channel_stats

MODES = {True: "zscore", False: "", "zscore": "zscore", "phi_s": "phi_s", "none": ""}
#: images a teacher without stored PHI-S parameters measures them on
PHI_S_IMAGES = 64


def standardize_mode(value: Any) -> str:
    """``distillation.standardize`` -> 'zscore' | 'phi_s' | '' (off); anything else is a ConfigError."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in MODES:
        raise ConfigError(f"distillation.standardize: {value!r} is not one of true (= zscore), false, zscore, phi_s")
    return MODES[value]


def set_teacher_stats(router: Any, distiller: Any, plain_loader: Callable[[], Any], log: logging.Logger,
                      mode: str = "zscore") -> None:
    """Hand the distiller each teacher's standardisation per distilled feature. ``plain_loader()``: a loader
    of training images without cached targets, built only when a live teacher must measure."""
    if mode == "phi_s":
        set_teacher_phi_s(router, distiller, plain_loader, log)
        return
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


def set_teacher_phi_s(router: Any, distiller: Any, plain_loader: Callable[[], Any], log: logging.Logger) -> None:
    """PHI-S per distilled feature: the cache's stored transform; else measured on the live teacher (up to
    :data:`PHI_S_IMAGES` training images) or on the cache's first images (a cache written before PHI-S)."""
    for name, src in router.sources.items():
        used = distiller.features_used(name)
        found: Dict[str, PhiS] = {}
        if src.cache is not None:
            found = {f: p for f in used if (p := src.cache.reader.phi_s(f)) is not None}
        missing = [f for f in used if f not in found]
        if missing and src.live is not None:
            found.update(measure_phi_s(_live_maps(src.live, plain_loader()), missing))
            log.info("teacher %s: PHI-S of %s measured on up to %d training images", name, missing, PHI_S_IMAGES)
        elif missing and src.cache is not None:
            found.update(measure_phi_s(_cached_maps(src.cache.reader), missing))
            log.warning("teacher %s: the cache holds no PHI-S transform of %s (written before it existed): measured "
                        "on its first %d images", name, missing, PHI_S_IMAGES)
        for feature in used:
            if feature not in found:
                raise ConfigError(f"teacher {name}: no PHI-S transform for {feature} (no cache, no live teacher)")
            distiller.set_teacher_phi_s(name, feature, found[feature])


def measure_phi_s(maps: Iterable[Dict[str, Any]], features: Iterable[str]) -> Dict[str, PhiS]:
    """PHI-S of ``features`` over ``maps``: per image {name: ((C, h, w) map, valid rows, valid cols)}."""
    sums: Dict[str, CovarianceSum] = {}
    for image in maps:
        for name in features:
            fmap, rows, cols = image[name]
            sums.setdefault(name, CovarianceSum(fmap.shape[0])).add(valid_vectors(fmap, rows, cols))
    return {name: phi_s_from_moments(*acc.moments()) for name, acc in sums.items()}


def _live_maps(online: Any, batches: Iterable[Any]) -> Iterable[Dict[str, Any]]:
    seen = 0
    for batch in batches:
        t = online.targets(batch)
        valid = t.valid_hw.cpu().numpy()
        for i in range(len(batch)):
            out = {}
            for name, fmap in t.features.items():
                h, w = fmap.shape[-2:]
                rows, cols = valid_cells(valid[i:i + 1], t.input_size // h, h, w)
                out[name] = (fmap[i].float().cpu(), int(rows[0]), int(cols[0]))
            yield out
            seen += 1
            if seen >= PHI_S_IMAGES:
                return


def _cached_maps(reader: Any) -> Iterable[Dict[str, Any]]:
    ids = [i for i, done in zip(reader.image_ids, reader.done) if done][:PHI_S_IMAGES]
    for image_id in ids:
        entry = reader.read(image_id)
        out = {}
        for name, fmap in entry["features"].items():
            h, w = fmap.shape[-2:]
            rows, cols = valid_cells(entry["valid_hw"].numpy()[None], entry["input_size"] // h, h, w)
            out[name] = (fmap, int(rows[0]), int(cols[0]))
        yield out
