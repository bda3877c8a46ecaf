"""teacher.backend (vfmkd/teachers/sam_fast.py): SAM's encoder through SDPA computes the stock features on the
same weights within float32 rounding, and the choice leaves the cache fingerprint alone (same features)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vfmkd.core.errors import ConfigError
from vfmkd.teachers import SamTeacher
from vfmkd.teachers.sam_fast import SdpaAttention

#: max |fast - stock| / max |stock| per map (measured ~2e-6 at 64-128 px on 2 threads)
TOLERANCE = 1e-4


def test_fast_and_stock_sam_encoders_agree_on_the_same_weights(coco128):
    teacher = SamTeacher(init="random", input_size=64, device="cpu")  # fast is the default
    blocks = teacher.sam.image_encoder.blocks
    assert teacher.backend == "fast" and all(isinstance(b.attn, SdpaAttention) for b in blocks)
    paths = sorted((coco128 / "images" / "train2017").glob("*.jpg"))[:2]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    fast, _ = teacher.extract_features(images)
    teacher.use_backend("stock")
    assert not any(isinstance(b.attn, SdpaAttention) for b in blocks)
    stock, _ = teacher.extract_features(images)
    for name, want in stock.items():
        err = float((fast[name] - want).abs().max() / want.abs().max())
        assert err <= TOLERANCE, (name, err)


def test_the_backend_leaves_the_fingerprint_and_unknown_backends_are_refused():
    fast = SamTeacher.config_fingerprint(init="random", input_size=128, backend="fast")
    assert fast == SamTeacher.config_fingerprint(init="random", input_size=128, backend="stock", compile=True)
    with pytest.raises(ConfigError, match="teacher.backend"):
        SamTeacher.config_fingerprint(init="random", input_size=128, backend="flash")
