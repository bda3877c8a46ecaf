"""Official teacher checkpoints: where to download them and the sha256 that proves a file is intact.

The sha256 values and sizes are pinned so a truncated or swapped download is caught before it is
loaded. Sources (all agree): computational-cell-analytics/micro-sam ``micro_sam/util.py``
``_CHECKSUMS`` and several independent public download manifests that pin sha256 and byte size
of the same files. A value of ``None`` would mean "not pinned" and the downloader says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

from vfmkd.core.errors import ConfigError, did_you_mean

_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class OfficialWeights:
    """One downloadable checkpoint: ``name`` is what ``tools/download_weights.py --model`` takes."""

    name: str
    family: str
    variant: str
    url: str
    filename: str
    sha256: Optional[str]
    size_bytes: Optional[int] = None

    @property
    def download_command(self) -> str:
        return f"python tools/download_weights.py --model {self.name}"


def _sam(variant: str, filename: str, sha256: str, size_bytes: int) -> OfficialWeights:
    return OfficialWeights(
        name=f"sam_{variant}",
        family="sam",
        variant=variant,
        url=_SAM_BASE_URL + filename,
        filename=filename,
        sha256=sha256,
        size_bytes=size_bytes,
    )


OFFICIAL_WEIGHTS: Dict[str, OfficialWeights] = {
    w.name: w
    for w in (
        _sam("vit_b", "sam_vit_b_01ec64.pth",
             "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
        _sam("vit_l", "sam_vit_l_0b3195.pth",
             "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1_249_524_607),
        _sam("vit_h", "sam_vit_h_4b8939.pth",
             "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2_564_550_879),
    )
}


def weights_for(family: str, variant: str) -> OfficialWeights:
    """The official checkpoint of ``family``/``variant`` (e.g. ``"sam", "vit_b"``)."""
    for w in OFFICIAL_WEIGHTS.values():
        if w.family == family and w.variant == variant:
            return w
    known = [f"{w.family}/{w.variant}" for w in OFFICIAL_WEIGHTS.values()]
    raise ConfigError(
        f"no official weights for {family}/{variant}.{did_you_mean(f'{family}/{variant}', known)} "
        f"Known: {', '.join(known)}."
    )


def default_checkpoint_path(name: str, weights_dir: Union[str, Path] = "weights") -> Path:
    """Where the downloader puts ``name`` (e.g. ``weights/sam_vit_b_01ec64.pth``)."""
    if name not in OFFICIAL_WEIGHTS:
        raise ConfigError(
            f"unknown weights '{name}'.{did_you_mean(name, OFFICIAL_WEIGHTS)} "
            f"Known: {', '.join(OFFICIAL_WEIGHTS)}."
        )
    return Path(weights_dir) / OFFICIAL_WEIGHTS[name].filename
