"""Cheap SAMs for tests: segment-anything's own vit_b, built by its own build_sam, with attention windows of
``window`` x ``window`` tokens instead of 14 x 14. At a test's tiny input (e.g. 64 px: 4 x 4 tokens) SAM pads every
window to 14 x 14, so its windowed blocks cost as much as at 224 px; a small window makes them ~10x cheaper while
the weights keep vit_b's shapes (except the windowed blocks' relative-position tables, random here anyway)."""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import pytest
from segment_anything.modeling import ImageEncoderViT


@contextlib.contextmanager
def small_window_sam(window: int = 2) -> Iterator[None]:
    """Inside the block, every SAM that segment-anything builds has attention windows of ``window`` tokens."""
    with pytest.MonkeyPatch.context() as patch:
        # the module (segment_anything.build_sam is also the name of a function the package exports)
        builders = importlib.import_module("segment_anything.build_sam")
        patch.setattr(builders, "ImageEncoderViT", lambda **kw: ImageEncoderViT(**{**kw, "window_size": window}))
        yield
