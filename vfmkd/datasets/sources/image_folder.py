"""A folder of unlabelled images (any depth) as a :class:`SplitList`: feature and output distillation
only, every image unlabelled. The split's folder is ``<folder>/<split>`` when it exists, else the
whole folder (every split then holds the same images)."""
from __future__ import annotations

from pathlib import Path

from vfmkd.core.errors import DatasetError
from vfmkd.datasets.sources.split_list import IMAGE_SUFFIXES, SplitList, find_images


def split_folder(folder: Path, split: str) -> Path:
    return folder / split if (folder / split).is_dir() else folder


def unlabelled_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth, extensions of :data:`IMAGE_SUFFIXES`, any case)."""
    paths = find_images(folder)
    if not paths:
        raise DatasetError(f"no images ({'/'.join(IMAGE_SUFFIXES)}, any case, any depth) under {folder}")
    return paths


def load_split(folder: Path, split: str) -> SplitList:
    """Every image under the split's folder, unlabelled, with no class table."""
    where = split_folder(folder, split)
    paths = unlabelled_images(where)
    return SplitList(paths, [None] * len(paths), [None] * len(paths), {}, f"{where} (unlabelled images)")
