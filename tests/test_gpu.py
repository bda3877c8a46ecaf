"""GPU paths (run with `pytest -m gpu` on a CUDA machine; skipped elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vfmkd.teachers import SamTeacher

pytestmark = pytest.mark.gpu


def _images(coco128, n=2):
    paths = sorted((coco128 / "images" / "val2017").glob("*.jpg"))[:n]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_sam_bf16_teacher_agrees_with_fp32(coco128):
    torch.manual_seed(0)
    fp32 = SamTeacher(init="random", input_size=512, device="cuda", dtype="float32")  # auto would be bf16 here
    bf16 = SamTeacher(init="random", input_size=512, device="cuda", dtype="bfloat16")
    bf16.load_state_dict(fp32.state_dict())
    images = _images(coco128)
    a, _ = fp32.extract_features(images)
    b, _ = bf16.extract_features(images)
    cos = F.cosine_similarity(a["image_embeddings"], b["image_embeddings"], dim=1).mean()
    assert bf16.fingerprint().dtype == "bfloat16"
    assert cos > 0.99, float(cos)


def test_auto_resolves_to_the_gpu_and_bf16():
    """On a real GPU: teachers and the student default onto it, in bf16 where it is supported."""
    from vfmkd.core.device import resolve_amp, resolve_device

    teacher = SamTeacher(init="random", input_size=64)  # device/dtype auto
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert teacher.device.type == "cuda" and teacher.dtype == ("bfloat16" if bf16 else "float32")
    assert resolve_device("auto").type == "cuda" and resolve_amp("auto", "cuda") is bf16
