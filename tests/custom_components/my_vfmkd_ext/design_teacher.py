"""A user teacher written to the design's guide as docs/adding_a_teacher.md spells it: subclass
``BaseTeacher`` and implement feature extraction (``preprocess`` + ``forward_features``) and mask
prediction (``can_segment`` + ``mask_logits``). A frozen random conv stands in for the model."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, TeacherBatch, check_rgb_images, resized_hw
from vfmkd.teachers.loading import load_teacher_weights, seeded

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@TEACHERS.register("design_teacher")
class DesignTeacher(BaseTeacher):
    family = "design_teacher"
    primary_feature = "features"
    variants = {"small": 16, "base": 32}  # variant -> channels
    preprocessing = "design_teacher:resize-long-side,pad-bottom-right,imagenet-norm"
    can_segment = True

    def __init__(self, variant: str = "small", checkpoint: Optional[str] = None, input_size: int = 64,
                 init: str = "pretrained", dtype: str = "float32", device: str = "cpu", seed: int = 0) -> None:
        super().__init__()
        settings = DesignTeacher.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size,
                                               init=init, dtype=dtype, device=device, seed=seed)
        dev = self._adopt(settings, "DesignTeacher")
        state_dict, self._weights_id = load_teacher_weights("DesignTeacher", self.family, settings.variant,
                                                            checkpoint, settings.init, seed, lambda sd, p: None)
        with seeded(seed):
            self.encoder = nn.Conv2d(3, self.variants[settings.variant], 16, 16)
        if state_dict is not None:
            self.encoder.load_state_dict(state_dict)
        self.to(dev)
        self.freeze()

    @classmethod
    def _input_multiple(cls, settings) -> Tuple[int, str]:
        return 16, "the patch size"

    @property
    def input_size(self) -> int:
        return self.settings.input_size

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return (FeatureSpec("features", self.variants[self.variant], 16),)

    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        check_rgb_images(images, "DesignTeacher")
        s = self.input_size
        pixels, affine, valid = torch.zeros(len(images), 3, s, s), torch.zeros(len(images), 4), []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            nh, nw = resized_hw(h, w, s)
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
            pixels[i, :, :nh, :nw] = (x.clamp(0, 1) - MEAN) / STD
            affine[i] = torch.tensor(self.input_affine(h, w, s))
            valid.append([nh, nw])
        return TeacherBatch(pixels=pixels, affine=affine, valid_hw=torch.tensor(valid))

    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        with self.autocast():
            return {"features": self.encoder(pixels).float()}

    def mask_logits(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor,
                    batch_idx: torch.Tensor) -> torch.Tensor:
        """(N, S/4, S/4): +4 inside each box, -4 outside, shaded by the image's feature energy."""
        side = self.input_size // 4
        energy = features["features"].float().mean(1, keepdim=True)
        energy = F.interpolate(energy, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
        out = torch.full((boxes.shape[0], side, side), -4.0, device=boxes.device)
        for i, idx in enumerate(self._boxes_by_image(boxes, batch_idx, energy.shape[0])):
            for n in idx.tolist():
                x1, y1, x2, y2 = (boxes[n] / 4).round().long().tolist()
                out[n, max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)] = 4.0
            out[idx] += energy[i].tanh()
        return out
