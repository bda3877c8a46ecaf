"""Image files: listing a split's images, probing and checking them before training (undecodable,
truncated, high-bit-depth), and decoding one to upright 8-bit RGB (EXIF orientation, 16-bit scaling):
the one image decoder every tool uses."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

from vfmkd.core.errors import DatasetError
from vfmkd.datasets.sources.split_list import IMAGE_SUFFIXES

LOGGER = logging.getLogger("vfmkd")
EXIF_ORIENTATION = 0x0112  # 5..8 transpose the image: the upright (h, w) is the stored (w, h)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integer grayscale beyond 8 bits (16-bit PNG/TIFF)
FLOAT_MODE = "F"
TWELVE_BIT_MAX = 4095  # a 16-bit image whose values never exceed this probably holds 12-bit data


def pil_open() -> Callable[..., Any]:
    """Pillow's own ``Image.open``, not ultralytics' patch (which, on an unidentified file, tries to
    install pi-heif and then reports ``No module named 'pi_heif'`` instead of Pillow's reason)."""
    opener = Image.open
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and opener is getattr(patches, "image_open", None):
        opener = getattr(patches, "_image_open", opener)
    return opener


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block: Pillow decodes the pixels as stored
        return 1


def list_images(root: str | Path, split: str, limit: Optional[int] = None) -> List[Path]:
    """Image files of ``root/images/<split>`` sorted by name; ``limit`` keeps the first N."""
    folder = Path(root) / "images" / split
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder} (expected <root>/images/<split>/*.jpg; other formats: "
                           f"data.format, docs/your_data.md)")
    entries = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    ignored = [p.name for p in entries if p not in files and not p.name.startswith(".")]
    if ignored:  # an image in another format would otherwise vanish from the split without a word
        LOGGER.warning(f"{folder}: ignored {len(ignored)} file(s) that are not {'/'.join(IMAGE_SUFFIXES)} images: "
                       f"{', '.join(ignored[:5])}{', ...' if len(ignored) > 5 else ''}")
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    stems: Dict[str, Path] = {}
    for p in files:  # the stem is the image id (labels, caches): it must be unique
        if p.stem in stems:
            raise DatasetError(f"two images share the id '{p.stem}': {stems[p.stem].name} and {p.name}; rename one")
        stems[p.stem] = p
    return files[:limit] if limit is not None else files


def probe_image(path: Path) -> Tuple[int, int]:
    """Decode ``path`` cheaply and return its upright (h, w) (after the EXIF orientation, as
    :func:`load_rgb` returns it); raises if it cannot be decoded.

    JPEGs are decoded at 1/8 scale (``Image.draft``): the DCT is skipped but the whole entropy
    stream is still read, so a truncated file fails (``LOAD_TRUNCATED_IMAGES`` stays False).
    Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) applies and is never lifted.
    """
    return _probe(path)[0]


def _probe(path: Path) -> Tuple[Tuple[int, int], str, str]:
    """(upright (h, w), depth, caution): ``depth`` names a 16-bit/float image ('' for 8-bit),
    ``caution`` says why its 8-bit version may mislead (values only in the low 12 bits: dark;
    float values outside [0, 1]: clipped), '' when nothing does."""
    with pil_open()(path) as im:
        w, h = im.size
        transposed = _orientation(im) in (5, 6, 7, 8)
        if im.format == "JPEG":
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()
        depth = caution = ""
        if im.mode in HIGH_BIT_MODES or im.mode == FLOAT_MODE:
            values = np.asarray(im)
            lo, hi = float(values.min()), float(values.max())
            depth = f"mode {im.mode}"
            if im.mode == FLOAT_MODE and (lo < 0.0 or hi > 1.0):
                caution = f"float values in [{lo:g}, {hi:g}], clipped to [0, 1]"
            elif im.mode != FLOAT_MODE and (lo < 0 or hi > 65535):
                caution = f"values in [{lo:g}, {hi:g}], clipped to [0, 65535]"
            elif im.mode != FLOAT_MODE and 0 < hi <= TWELVE_BIT_MAX:
                caution = f"values <= {hi:g} (12-bit data?): dark after full-range scaling; rescale to 0..65535"
    return ((w, h) if transposed else (h, w)), depth, caution


def check_images(paths: Sequence[Path], split: str) -> Tuple[List[Path], List[Tuple[int, int]], List[Tuple[str, str]]]:
    """Split ``paths`` into decodable ones (with their (h, w)) and skipped (path, reason); logs one line."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone turned it on: truncated files would pass as grey
        LOGGER.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images cannot be detected")
    ok, sizes, skipped = [], [], []
    wide: List[str] = []
    cautions: List[str] = []
    for p in paths:
        try:
            hw, depth, caution = _probe(p)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            skipped.append((str(p), f"{type(exc).__name__}: {exc}"))
            continue
        sizes.append(hw)
        ok.append(p)
        wide += [p.name] if depth else []
        cautions += [f"{p.name} ({caution})"] if caution else []
    if wide:
        LOGGER.info(f"{split}: {len(wide)} of {len(paths)} images are 16-bit or float grayscale (e.g. {wide[0]}): "
                    f"scaled to 8 bit linearly, 0..65535 (float: 0..1) -> 0..255")
    if cautions:
        LOGGER.warning(f"{split}: {len(cautions)} high-bit-depth image(s) may look wrong at 8 bit: "
                       f"{'; '.join(cautions[:10])}")
    if skipped:
        names = "; ".join(f"{p} ({why})" for p, why in skipped)
        LOGGER.warning(f"skipped {len(skipped)} of {len(paths)} images in {split} that cannot be decoded: {names}")
    return ok, sizes, skipped


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> RGB uint8 (H, W, 3) by the documented rule (docs/bad_input.md):
    integer grayscale wider than 8 bits (``I;16*``, ``I``: 16-bit PNG/TIFF) maps its full 16-bit
    range linearly, ``round(v * 255 / 65535)`` (0 -> 0, 65535 -> 255; values outside clipped);
    float grayscale (``F``) maps [0, 1] linearly (clipped); every other mode is Pillow's
    ``convert("RGB")``. Pillow's own conversion clips 16-bit values at 255 (an all-white image)."""
    if im.mode in HIGH_BIT_MODES or im.mode == FLOAT_MODE:
        values = np.asarray(im, dtype=np.float64)
        full_scale = 1.0 if im.mode == FLOAT_MODE else 65535.0
        grey = np.rint(np.clip(values, 0.0, full_scale) * (255.0 / full_scale)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def load_rgb(path: str | Path) -> np.ndarray:
    """Full decode to an RGB uint8 (H, W, 3) array, upright (EXIF orientation applied, as the
    COCO/YOLO labels assume), 16-bit and float images scaled by :func:`to_rgb8`; the one decoder
    for students, teachers, the cache tool, prediction and the loggers."""
    with pil_open()(path) as im:
        if _orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
        return to_rgb8(im)
