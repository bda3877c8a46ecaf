"""SAM (segment-anything v1) as a frozen teacher, built on the real ``segment_anything`` package.

The model, SAM's resize (``ResizeLongestSide``) and its predictor all come from the library; this
module only loads weights safely, optionally re-sizes the absolute position embedding for a
smaller input, and exposes two feature maps from one encoder pass.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from vfmkd.core.errors import CheckpointError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.core.sam_variants import SAM_VARIANTS, detect_sam_variant
from vfmkd.teachers.base import MASK_CHUNK, BaseTeacher, TeacherBatch, TeacherSettings, check_rgb_images, resized_hw
from vfmkd.teachers.loading import checkpoint_path, load_teacher_weights, seeded
from vfmkd.teachers.sam_fast import BACKENDS, set_backend
from vfmkd.teachers.settings import check_choice

logger = logging.getLogger("vfmkd")

_PATCH = 16  # SAM's ViT patch size: every feature map has stride 16
_PRETRAIN_SIZE = 1024  # the official checkpoints' input size (64x64 pos_embed)
# SAM's own normalisation constants (0-255 pixels), read from the library so the fingerprint of a
# config (no model built) is the one of a built model.
_SAM_DEFAULTS = inspect.signature(Sam.__init__).parameters
SAM_MEAN = tuple(float(v) for v in _SAM_DEFAULTS["pixel_mean"].default)
SAM_STD = tuple(float(v) for v in _SAM_DEFAULTS["pixel_std"].default)
_fmt = lambda t: "/".join(f"{v:.3f}" for v in t)  # noqa: E731


def wrong_variant_error(path: Path | str, found: str, variant: str) -> CheckpointError:
    """The error for a base SAM file of size ``found`` under ``teacher.variant=variant``."""
    return CheckpointError(f"checkpoint {path} is a SAM {found} image encoder but teacher.variant is {variant}; "
                           f"set teacher.variant={found} or teacher.variant=auto (or use the {variant} checkpoint).")


@TEACHERS.register("sam")
class SamTeacher(BaseTeacher):
    """Frozen SAM image encoder.

    Features for a ``(B, 3, S, S)`` batch (``S = input_size``):
    ``trunk`` ``(B, embed_dim, S/16, S/16)`` (ViT output before the neck) and ``image_embeddings``
    ``(B, 256, S/16, S/16)`` (after the neck; what SAM's mask decoder consumes; the primary one).
    Features are returned in float32 whatever the compute dtype. ``backend``: ``fast`` (default: SDPA
    attention, channels_last convs; the stock features within float32 rounding) or ``stock``;
    ``compile``: ``torch.compile`` the encoder pass (vfmkd/teachers/sam_fast.py).
    """

    family = "sam"
    primary_feature = "image_embeddings"
    can_segment = True

    variants = SAM_VARIANTS
    default_variant = "vit_b"
    preprocessing = f"sam:resize-longest-side,pad-bottom-right,mean={_fmt(SAM_MEAN)},std={_fmt(SAM_STD)}"

    def __init__(
        self,
        variant: str = "auto",
        checkpoint: Optional[str] = None,
        input_size: int = 1024,
        init: str = "pretrained",
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        backend: str = "fast",
        compile: bool = False,
    ) -> None:
        super().__init__()
        # Bound to SamTeacher's own signature: a subclass (LoRA-SAM) validates its extra keys itself
        # and replaces self.settings with its full record. backend/compile change how the encoder
        # computes, not what: they stay out of the fingerprint (vfmkd/teachers/sam_fast.py).
        settings = SamTeacher.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size,
                                            init=init, dtype=dtype, device=device, seed=seed, backend=backend,
                                            compile=compile)
        dev = self._adopt(settings, "SAM")
        variant = settings.variant  # `auto` resolved from the weights file

        def check(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
            found = detect_sam_variant(state_dict, source=f"checkpoint {path}")
            if found != variant:
                raise wrong_variant_error(path, found, variant)

        path = checkpoint_path("sam", variant, checkpoint)
        state_dict, self._weights_id = load_teacher_weights("SAM", "sam", variant, checkpoint, init, seed, check)

        # Built at 1024, the size of the official weights. Random weights come from `seed` alone, so
        # the cache tool and a later live pass of the same config hold the same random teacher.
        with seeded(seed):
            self.sam = sam_model_registry[variant]()
        if state_dict is not None:
            try:
                self.sam.load_state_dict(state_dict, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"checkpoint {path} does not fit SAM {variant}: {err}") from None
            logger.info("Loaded SAM checkpoint from: %s", path)
        if input_size != _PRETRAIN_SIZE:
            self._resize_input(input_size)

        self._transform = ResizeLongestSide(input_size)  # SAM's own resize (the numpy path)
        # CPU copies of SAM's normalisation buffers: preprocessing runs on CPU in data workers.
        self._mean = self.sam.pixel_mean.detach().cpu().clone()  # (3, 1, 1)
        self._std = self.sam.pixel_std.detach().cpu().clone()
        self._predictor: Optional[SamPredictor] = None
        self._predictor_key: Optional[str] = None
        self.to(dev)
        self.freeze()
        self.use_backend(backend)
        self._encode = torch.compile(self._encoder_pass) if compile else self._encoder_pass

    def use_backend(self, backend: str) -> None:
        """``fast`` (SDPA attention, channels_last convs) or ``stock`` (segment-anything as is), in place."""
        check_choice("backend", backend, BACKENDS)
        set_backend(self.sam.image_encoder, backend)
        self.backend = backend

    # ------------------------------------------------------------------ geometry
    def _resize_input(self, size: int) -> None:
        """Adapt the 1024-trained model to ``size``: bicubic pos_embed (1, g, g, C), g = size/16,
        and the sizes SAM's prompt encoder and predictor read. The relative position tables of the
        global-attention blocks are interpolated by segment-anything itself at run time."""
        enc, grid = self.sam.image_encoder, size // _PATCH
        if enc.pos_embed is not None:
            pe = enc.pos_embed.detach().permute(0, 3, 1, 2)  # (1, C, 64, 64)
            pe = F.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False)
            enc.pos_embed = nn.Parameter(pe.permute(0, 2, 3, 1).contiguous(), requires_grad=False)
        enc.img_size = size  # read by Sam.preprocess/postprocess_masks and SamPredictor
        pe_enc = self.sam.prompt_encoder
        pe_enc.input_image_size = (size, size)
        pe_enc.image_embedding_size = (grid, grid)
        pe_enc.mask_input_size = (4 * grid, 4 * grid)

    @property
    def input_size(self) -> int:
        return self.settings.input_size

    @classmethod
    def detect_variant(cls, state_dict: Dict[str, torch.Tensor], source: str) -> str:
        return detect_sam_variant(state_dict, source)

    @classmethod
    def _input_multiple(cls, settings: TeacherSettings) -> Tuple[int, str]:
        return _PATCH, "SAM's patch size"

    @classmethod
    def _check_settings(cls, settings: TeacherSettings) -> None:
        super()._check_settings(settings)
        if "backend" in settings.extra:  # LoRA-SAM's record has no backend key: it runs SAM's default
            check_choice("backend", settings.extra["backend"], BACKENDS)

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        embed_dim = SAM_VARIANTS[self.variant][0]
        return (FeatureSpec("trunk", embed_dim, _PATCH), FeatureSpec("image_embeddings", 256, _PATCH))

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """RGB uint8 ``(H_i, W_i, 3)`` images -> pixels ``(B, 3, S, S)`` float32 on CPU,
        affine ``(B, 4)`` float32 = (new_w/w, new_h/h, 0, 0), valid_hw ``(B, 2)`` int64 = (new_h, new_w)."""
        check_rgb_images(images, "SamTeacher")
        s = self.input_size
        pixels = torch.zeros(len(images), 3, s, s)
        affine = torch.zeros(len(images), 4)
        valid = torch.zeros(len(images), 2, dtype=torch.long)
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            resized = self._transform.apply_image(img)  # (new_h, new_w, 3) uint8, long side = s
            nh, nw = resized.shape[:2]
            x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
            pixels[i, :, :nh, :nw] = (x - self._mean) / self._std  # zero padding bottom/right, as SAM
            affine[i] = torch.tensor([nw / w, nh / h, 0.0, 0.0])
            valid[i] = torch.tensor([nh, nw])
        return TeacherBatch(pixels=pixels, affine=affine, valid_hw=valid)

    @torch.no_grad()
    def preprocess_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """:meth:`preprocess` on the device: canvases ``(B, 3, H, W)`` in [0, 1] and content boxes
        ``(B, 4)`` -> pixels ``(B, 3, S, S)``, affine ``(B, 4)`` (crop pixels -> teacher pixels),
        valid_hw ``(B, 2)``, all on ``images.device``. The resize is segment-anything's own torch
        recipe (``ResizeLongestSide.apply_image_torch``: bilinear, antialiased, to the same size as
        the PIL path), then SAM's normalisation and zero padding bottom/right."""
        return self._resize_crops(images, boxes, lambda h, w: resized_hw(h, w, self.input_size), "bilinear",
                                  self._mean, self._std, value_scale=255.0)

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> {"trunk": (B, embed_dim, S/16, S/16), "image_embeddings": (B, 256, S/16, S/16)};
        the same maths as ``ImageEncoderViT.forward`` with the trunk kept on the way."""
        s = self.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"SamTeacher expects pixels (B, 3, {s}, {s}), got {tuple(pixels.shape)}.")
        pixels = pixels.to(self.device)
        if self.backend == "fast":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            trunk, emb = self._encode(pixels)
        return {"trunk": trunk.float().contiguous(), "image_embeddings": emb.float().contiguous()}

    def _encoder_pass(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(trunk (B, C, S/16, S/16), image_embeddings (B, 256, S/16, S/16)) in the compute dtype."""
        enc = self.sam.image_encoder
        x = enc.patch_embed(pixels)  # (B, S/16, S/16, C): SAM blocks are channels-last
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for blk in enc.blocks:
            x = blk(x)
        trunk = x.permute(0, 3, 1, 2)
        return trunk, enc.neck(trunk)

    # ------------------------------------------------------------------ prompting
    @torch.no_grad()
    def mask_logits(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor,
                    batch_idx: torch.Tensor) -> torch.Tensor:
        """Box prompts -> (N, S/4, S/4) float32 mask logits, by SAM's own prompt encoder and mask decoder
        on ``features["image_embeddings"]`` (B, 256, S/16, S/16): per image ``b``,
        ``prompt_encoder(points=None, boxes=boxes[batch_idx == b], masks=None)`` then
        ``mask_decoder(image_embeddings=emb[b:b+1], image_pe=prompt_encoder.get_dense_pe(), ...,
        multimask_output=False)``, i.e. exactly what ``SamPredictor.predict_torch`` computes as
        ``low_res_masks`` for boxes in input-frame pixels (``boxes`` (N, 4) x1, y1, x2, y2 in teacher
        pixels, ``batch_idx`` (N,) int64). The prompt encoder's sizes follow ``input_size``."""
        emb = features["image_embeddings"]
        side = 4 * emb.shape[-1]
        per_image = self._boxes_by_image(boxes, batch_idx, emb.shape[0])
        out = torch.zeros(len(boxes), side, side, dtype=torch.float32, device=self.device)
        pe_enc, dec = self.sam.prompt_encoder, self.sam.mask_decoder
        emb = emb.to(self.device)
        dense_pe = pe_enc.get_dense_pe()
        prompts = boxes.to(self.device, torch.float32)
        with self.autocast():
            for b, rows in enumerate(per_image):
                for chunk in rows.split(MASK_CHUNK) if len(rows) else ():
                    chunk = chunk.to(self.device)
                    sparse, dense = pe_enc(points=None, boxes=prompts[chunk], masks=None)
                    low_res, _ = dec(image_embeddings=emb[b:b + 1], image_pe=dense_pe, sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
                    out[chunk] = low_res[:, 0].float()
        return out

    @torch.no_grad()
    def predict_masks(
        self,
        image: np.ndarray,
        boxes: Optional[np.ndarray] = None,
        points: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        multimask_output: bool = True,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment ``image`` (RGB uint8 (H, W, 3)) with SAM's own predictor on this teacher's model.

        ``boxes``: (4,) or (K, 4) XYXY in original pixels; ``points``: (P, 2) XY with
        ``point_labels`` (P,) 1=foreground/0=background (default all 1); points apply to every box.
        Returns ``masks`` bool (N, H, W), ``scores`` float32 (N,), ``low_res_logits`` float32
        (N, S/4, S/4) with N = K * C, box-major, and C = 3 if ``multimask_output`` else 1 (K = 1 without boxes).
        """
        if boxes is None and points is None:
            raise ValueError("predict_masks needs boxes and/or points.")
        pred = self._predictor_for(image)
        dev, size = self.device, pred.original_size
        coords = labels = box_t = None
        if points is not None:
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            lbl = np.ones(len(pts)) if point_labels is None else np.asarray(point_labels).reshape(-1)
            if len(lbl) != len(pts):
                raise ValueError(f"{len(pts)} points but {len(lbl)} point_labels.")
            coords = torch.as_tensor(pred.transform.apply_coords(pts, size), dtype=torch.float, device=dev)[None]
            labels = torch.as_tensor(lbl, dtype=torch.int, device=dev)[None]
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            box_t = torch.as_tensor(pred.transform.apply_boxes(b, size), dtype=torch.float, device=dev)
            if coords is not None:  # the prompt encoder pairs points and boxes row by row
                coords, labels = coords.expand(len(b), -1, -1), labels.expand(len(b), -1)
        with self.autocast():
            masks, scores, low_res = pred.predict_torch(coords, labels, box_t, multimask_output=multimask_output)
        h, w = size
        return (
            masks.reshape(-1, h, w).cpu().numpy(),
            scores.float().reshape(-1).cpu().numpy(),
            low_res.float().reshape(-1, *low_res.shape[-2:]).cpu().numpy(),
        )

    def _predictor_for(self, image: np.ndarray) -> SamPredictor:
        """A SamPredictor with ``image`` set; the embedding is reused while the same image is prompted."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("predict_masks expects an RGB uint8 array (H, W, 3).")
        if self._predictor is None:
            self._predictor = SamPredictor(self.sam)
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() + str(image.shape)
        if key != self._predictor_key or not self._predictor.is_image_set:
            with self.autocast():
                self._predictor.set_image(image, image_format="RGB")
            self._predictor_key = key
        return self._predictor

