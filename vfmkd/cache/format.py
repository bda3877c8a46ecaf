"""HDF5 cache of teacher features: one file per teacher and split, ``<output_dir>/<split>.h5``.

Layout (N images, fixed at creation): ``image_ids`` (N,) utf-8; ``orig_hw`` (N, 2) int32;
``affine`` (N, 4) float32; ``valid_hw`` (N, 2) float32; ``done`` (N,) bool; ``features/<name>``
(N, C, h, w) in (1, C, h, w) chunks (one chunk per image): float16, or with ``storage=int8`` int8
plus float32 ``features/<name>_scale`` (N, h, w) per-cell and ``features/<name>_channel_scale`` (N, C)
per-channel scales (see cache_codec.py).
With a flip pass (``with_flip``): ``features_flip/<name>`` (same layout), ``affine_flip`` (N, 4) and
``valid_hw_flip`` (N, 2): the teacher on the horizontally mirrored image, its affine re-expressed for
ORIGINAL pixels (sx < 0). Statistics of the plain pass: ``stats/<name>/image_moments`` (N, 2, C)
float64 per-image [mean, sum of squared deviations] over valid cells, and, once every image is done,
``stats/<name>/mean`` and ``stats/<name>/std`` (C,) float32 (NaN until then), and the PHI-S transform
``stats/<name>/phi_s_rotation`` (C, C) float32 with the group attribute ``phi_s_alpha`` (phi_s.py).
Mask logits (``--outputs features,masks``; M = total prompt boxes of the N images, fixed at creation
from the label files): ``masks/offsets`` (N + 1,) int64 (image i owns rows offsets[i]:offsets[i+1],
K_i = its label rows, possibly 0), ``masks/label_index`` (M,) int64 (row of the prompt box in the
image's detection label file, as ``parse_labels`` returns them) and ``masks/cls`` (M,) int64, written
at creation; per pass (``masks`` and, with the flip pass, ``masks_flip``) ``logits`` (M, S/4, S/4)
float16 or int8 (+ ``scale`` (M,) float32 per mask), ``boxes`` (M, 4) float32 x1, y1, x2, y2 prompt
boxes in teacher pixels of that pass; ``masks_done`` (N,) bool. All contiguous and preallocated. The
``masks`` attribute (JSON) records ``prompt_source``, ``labels_sha256`` (:func:`label_files_sha256`),
``side`` and ``count``; ``outputs`` is ``features`` or ``features,masks``. A features-only cache
reopened with masks gets the mask datasets added and every batch recomputed (resumably).
Attributes: ``fingerprint``, ``teacher_config``, ``feature_specs`` (JSON), ``input_size``, ``dataset``,
``split``, ``batch_size``, ``storage``, ``with_flip``, ``format_version`` (1 for float16, 2 for
int8, which older readers must refuse), ``vfmkd_version``, ``teacher``, ``data_root``, plus the
writer's ``extra_attrs`` (the tool records ``compute``: device and torch threads).

The writer (feature_cache_writer.py) and the reader (feature_cache_reader.py) of this format, and the
writer's lock (cache_lock.py), live in their own modules; this one holds what they share: the errors,
the finite-value check, file naming, the label-file hash and the rebuild command.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np

from vfmkd.core.config import COMPONENT_REF_KEY, TEACHER_USAGE_KEYS, resolve_path
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.fingerprint import TeacherFingerprint

FORMAT_VERSION = 1  # float16 files (readable by every vfmkd reader); int8 files: codec.FORMAT_VERSIONS
TOOL = "python tools/prepare_teacher_features.py"
NOT_TEACHER_KWARGS = ("type", COMPONENT_REF_KEY, *TEACHER_USAGE_KEYS)


class CacheWriteError(OSError):
    """The cache cannot be written (no space, unwritable or invalid output path); errno is kept."""

    user_error = True  # vfmkd.utils.cli: one message, exit 2


class CorruptCacheError(CacheMismatchError):
    """Cached values are not finite (NaN/inf): the file is damaged."""


def finite_values(values: np.ndarray) -> bool:
    """True when ``values`` hold no NaN/inf. float16: NaN/inf have all exponent bits set, i.e. bit patterns
    0x7C00-0x7FFF (positive: above every finite value read as int16) and 0xFC00-0xFFFF (negative: above every
    finite value read as uint16); two integer maxima, no temporary array (~60x faster than numpy's float16
    ``isfinite``, 2x the masked pass it replaced); other dtypes: ``isfinite``."""
    if values.dtype == np.float16:
        flat = values.reshape(-1)
        return flat.size == 0 or (int(flat.view(np.int16).max()) < 0x7C00 and int(flat.view(np.uint16).max()) < 0xFC00)
    if values.dtype.kind != "f":
        return True
    return bool(np.isfinite(values).all())


OUTPUTS = ("features", "masks")


def label_files_sha256(label_dir: str | Path, image_ids: Sequence[str]) -> str:
    """sha256 over ``<id>\0<bytes of label_dir/<id>.txt>\0`` of every image in order (a missing file
    hashes as ``<missing>``): any edit, addition or removal of a label file changes it."""
    h, folder = hashlib.sha256(), Path(label_dir)
    for image_id in image_ids:
        path = folder / f"{image_id}.txt"
        h.update(image_id.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def cache_file(path: str | Path, split: str) -> Path:
    """``path`` itself when it names an .h5 file, else ``path/<split>.h5``."""
    p = Path(path)
    return p if p.suffix in (".h5", ".hdf5") else p / f"{split}.h5"


def dataset_cli_args(root: str | Path) -> tuple[str, Optional[str]]:
    """(--dataset name, --data-root or None when root is the default ``datasets/<name>``)."""
    root = Path(root)
    default = resolve_path(Path("datasets") / root.name)
    return root.name, None if root.resolve() == default.resolve() else str(root)


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)


def rebuild_command(teacher: str, dataset: str, split: str, output: str, data_root: Optional[str] = None,
                    teacher_config: Optional[Mapping[str, Any]] = None, limit: Optional[int] = None,
                    storage: str = "float16", with_flip: bool = False, features: Optional[Sequence[str]] = None,
                    outputs: Sequence[str] = ("features",), num_classes: int = 80) -> str:
    """The exact ``prepare_teacher_features`` command line that fills (or resumes) a cache;
    ``outputs`` ``("features", "masks")`` adds ``--outputs features,masks`` (mask logits prompted with
    the detection labels; ``num_classes`` for parsing them, named when not 80)."""
    args = ["--teacher", teacher, "--dataset", dataset] + (["--data-root", data_root] if data_root else [])
    args += ["--splits", split, "--output", output] + (["--limit", str(limit)] if limit else [])
    if "masks" in outputs:
        args += ["--outputs", ",".join(o for o in OUTPUTS if o in outputs)]
        args += ["--num-classes", str(num_classes)] if num_classes != 80 else []
    args += (["--features", ",".join(features)] if features else []) + (
        ["--storage", storage] if storage != "float16" else []
    )
    args += ["--with-flip"] if with_flip else []
    args += [f"teacher.{k}={_fmt(v)}" for k, v in (teacher_config or {}).items() if k not in NOT_TEACHER_KWARGS]
    return " ".join([TOOL] + [shlex.quote(a) for a in args])


def fingerprint_differences(cached: Mapping[str, Any], live: TeacherFingerprint,
                            ignore: Sequence[str] = ()) -> List[str]:
    """'field: cached != live' lines (TeacherFingerprint.differences, robust to added fields)."""
    try:
        return live.differences(TeacherFingerprint(**cached), ignore)
    except TypeError:
        mine = live.as_dict()
        keys = sorted(set(cached) | set(mine))
        return [
            f"{k}: {cached.get(k)!r} != {mine.get(k)!r}"
            for k in keys
            if k not in ignore and cached.get(k) != mine.get(k)
        ]


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    return value.decode() if isinstance(value, bytes) else value.item() if isinstance(value, np.generic) else value
