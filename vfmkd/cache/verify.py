"""Check a written cache against its teacher: recompute a few random cached images live and compare
(cosine per location, max abs and relative L2 error per feature and pass)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vfmkd.cache.fill import CacheTeacher, ImageLoader, run_teacher
from vfmkd.cache.reader import FeatureCacheReader

MIN_COSINE = 0.999


def compare(label: str, live: torch.Tensor, cached: torch.Tensor) -> bool:
    """Print cosine / max abs / relative L2 error of cached vs live (n, C, h, w); True if cosine passes."""
    a, c = live.float(), cached.float()
    cos = F.cosine_similarity(a, c, dim=1, eps=1e-12).mean().item()  # per location, over channels
    err = (a - c).abs().max().item()
    rel = ((a - c).norm() / a.norm().clamp_min(1e-12)).item()
    print(f"  {label}: mean cosine {cos:.6f}  max abs err {err:.3g}  rel L2 err {rel:.3g}"
          f"{'' if cos >= MIN_COSINE else f'  < {MIN_COSINE}: cache does not match this teacher'}")
    return cos >= MIN_COSINE


def verify(teacher: CacheTeacher, out_file: Path, paths: Sequence[Path], load: ImageLoader, n: int, seed: int,
           batch_size: int) -> bool:
    """Recompute ``n`` random cached images (and their mirrored copies for a flip pass) and print
    cosine / max abs / relative L2 error per feature and pass; True when all agree."""
    reader = FeatureCacheReader(out_file)
    done = [i for i in reader.image_ids if not reader.missing_ids([i])]
    pick = sorted(np.random.default_rng(seed).choice(len(done), size=min(n, len(done)), replace=False).tolist())
    ids = [done[i] for i in pick]
    if not ids:
        print(f"verify {out_file.name}: no cached images to verify")
        return False
    path_of = {p.stem: p for p in paths}
    passes = [False, True] if reader.has_flip else [False]
    live: Dict[bool, Dict[str, List[torch.Tensor]]] = {f: {} for f in passes}
    live_affine: Dict[bool, List[torch.Tensor]] = {f: [] for f in passes}
    for s in range(0, len(ids), batch_size):
        feats, geo, flip = run_teacher(teacher, [load(path_of[i]) for i in ids[s:s + batch_size]], reader.has_flip)
        for flipped, (fs, affine) in zip(passes, [(feats, geo.affine)] + ([flip[:2]] if flip else [])):
            for name, t in fs.items():
                live[flipped].setdefault(name, []).append(t.float().cpu())
            live_affine[flipped].append(affine.float().cpu())
    ok = True
    print(f"verify {out_file.name} (storage {reader.storage}): {len(ids)} images ({', '.join(ids)})")
    for flipped in passes:
        cached = [reader.read(i, flipped=flipped) for i in ids]
        tag = " (flip pass)" if flipped else ""
        same = torch.allclose(torch.cat(live_affine[flipped]), torch.stack([c["affine"] for c in cached]))
        ok &= same
        print(f"  affine{tag} {'matches' if same else 'DIFFERS'}")
        for spec in reader.feature_specs:
            ok &= compare(spec.name + tag, torch.cat(live[flipped][spec.name]),
                          torch.stack([x["features"][spec.name] for x in cached]))
    reader.close()
    return ok
