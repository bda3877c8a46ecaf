"""SAM 3's image encoder (the Perception-Encoder ViT and its two FPN necks) as a frozen teacher, with
box-prompted mask logits from its SAM-style tracker decoder, built on Hugging Face ``transformers``
(``transformers.models.sam3`` / ``sam3_tracker``, imported lazily: ``import vfmkd`` does not load it).

Checkpoint: the official Hugging Face release ``facebook/sam3`` (gated), a folder holding ``config.json``
(``model_type: sam3_video``) and ``model.safetensors`` (read without pickle). ``teacher.checkpoint`` is that
folder or its ``model.safetensors`` (``config.json`` must sit beside it); ``variant: auto`` reads the size
from the file. Of the file's modules the teacher keeps what an image pass needs, mapped as transformers'
``sam3_tracker`` conversion does: ``detector_model.vision_encoder.backbone.*`` (the ViT), ``tracker_neck.*``
(the tracker's FPN neck), ``tracker_model.{prompt_encoder,mask_decoder,shared_image_embedding,
no_memory_embedding}``, and ``detector_model.vision_encoder.neck.*`` (the detector's FPN neck); the text
encoder, DETR and video memory are not loaded. Meta's own ``sam3.pt`` (``detector.backbone.vision_backbone.*``
keys) is refused with the fix: transformers ships no converter for it; use the safetensors release.

Variants (``variant: auto`` reads them from the weights' tensors):

====== ===================================== ====== ===== ====== ======= ==========
name   model                                 width  depth heads  patch   params
====== ===================================== ====== ===== ====== ======= ==========
sam3   facebook/sam3 (PE ViT, 1008 px)       1024   32    16     14      466 M used
tiny   the same code at smoke-test size      32     2     2      14      0.17 M
====== ===================================== ====== ===== ====== ======= ==========

``tiny`` has no released weights: it exists for tests and ``init: random`` smoke runs. "used" counts the modules
the teacher builds (ViT, both necks, the tracker's prompt encoder and mask decoder) of the ~0.85 B release.

Features of a ``(B, 3, S, S)`` batch (``S = input_size``, a multiple of 28; official 1008), one ViT pass:

* ``patch_tokens`` ``(B, C_vit, S/14, S/14)``: the ViT's last hidden state (1024 channels for ``sam3``);
* ``fpn_s7`` / ``fpn_s14`` / ``fpn_s28`` ``(B, 256, S/k, S/k)``: the detector neck's levels at scale 2, 1
  and 0.5 (``Sam3VisionModel.fpn_hidden_states[1:]``); ``fpn_s14`` is the primary feature. The neck's
  scale-4 level has stride 3.5, which a :class:`FeatureSpec` (integer stride) cannot describe: not offered;
* ``tracker_s14`` ``(B, 256, S/14, S/14)``: the tracker neck's scale-1 level (the mask decoder's image
  embedding before ``no_memory_embedding`` is added);
* ``tracker_hires_s7`` ``(B, 64, S/7, S/7)``: ``mask_decoder.conv_s1`` of the tracker neck's scale-2 level;
* ``tracker_hires_packed_s7`` ``(B, 128, S/7, S/7)``: ``mask_decoder.conv_s0`` (32 channels) of the
  tracker's scale-4 level (stride 3.5), pixel-unshuffled 2x2 into channels so its stride is an integer
  (lossless; :meth:`Sam3Teacher.mask_logits` shuffles it back).

Per image at S=1008 in float16: patch_tokens 10.1 MiB, fpn_s7 10.1 MiB, fpn_s14 2.5 MiB, fpn_s28 0.6 MiB,
tracker_s14 2.5 MiB, tracker_hires_s7 2.5 MiB, tracker_hires_packed_s7 5.1 MiB (the cache tool stores only
the primary map unless ``--features`` says otherwise).

Preprocessing is transformers' ``Sam3ImageProcessor`` itself, at ``S x S``: the image is resized to the
square WITHOUT keeping its aspect ratio (bilinear, antialiased), scaled to [0, 1] and normalised with
mean = std = 0.5 (the processor's constants, checked at build against :attr:`Sam3Teacher.preprocessing`).
No padding: ``affine`` = (S / w, S / h, 0, 0) and ``valid_hw`` = (S, S), as for SAM2.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.base import MASK_CHUNK, BaseTeacher, TeacherBatch, TeacherSettings, check_rgb_images
from vfmkd.teachers.loading import auto_variant, checkpoint_path, config_weights_id, load_teacher_weights, seeded
from vfmkd.teachers.timm_teacher import describe_file

logger = logging.getLogger("vfmkd")

BACKBONE = "detector_model.vision_encoder.backbone."
PATCH_KEY = BACKBONE + "embeddings.patch_embeddings.projection.weight"
META_SAM3_KEY = "detector.backbone.vision_backbone.trunk.patch_embed.proj.weight"
#: this teacher's module prefix -> the official file's (transformers' ``sam3_tracker`` mapping + the detector neck)
KEY_MAP = (("tracker.vision_encoder.backbone.", BACKBONE), ("tracker.vision_encoder.neck.", "tracker_neck."),
           ("tracker.", "tracker_model."), ("detector_neck.", "detector_model.vision_encoder.neck."))
MEAN = STD = (0.5, 0.5, 0.5)
_SIZE_MULTIPLE = 28  # patch 14, and the scale-0.5 level max-pools the patch grid 2x
_FIX = ("use the model.safetensors and config.json of the Hugging Face repo facebook/sam3 (gated: accept the "
        "licence there), and set teacher.checkpoint to their folder")


@dataclass(frozen=True)
class Sam3Variant:
    """One SAM 3 size: the PE ViT's width, depth, heads and MLP width, its window and global-attention
    layers, and the FPN / decoder width (what ``transformers.Sam3VideoConfig`` takes)."""

    label: str
    width: int
    depth: int
    heads: int
    mlp: int
    window: int
    global_layers: Tuple[int, ...]
    hidden: int

    def video_config(self, input_size: int) -> Any:
        """``transformers.Sam3VideoConfig`` of this size at ``input_size``: transformers' defaults are facebook/sam3's
        (checked against this table); ``tiny`` shrinks every module."""
        from transformers import Sam3VideoConfig

        if self.width < 256:
            config = Sam3VideoConfig(**_tiny_config(self))
        else:
            config = Sam3VideoConfig()
            vit = config.detector_config.vision_config.backbone_config
            have = (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.intermediate_size)
            if have != (self.width, self.depth, self.heads, self.mlp):
                raise ConfigError(f"transformers' default Sam3VideoConfig has a ViT {have}, not SAM 3's "
                                  f"{(self.width, self.depth, self.heads, self.mlp)}: install the pinned transformers.")
        config.image_size = input_size
        return config


def _tiny_config(v: Sam3Variant) -> Dict[str, Any]:
    """``Sam3VideoConfig`` kwargs of the smoke-test size (every module small, the same code)."""
    vit = dict(model_type="sam3_vit_model", hidden_size=v.width, intermediate_size=v.mlp, num_hidden_layers=v.depth,
               num_attention_heads=v.heads, window_size=v.window, global_attn_indexes=list(v.global_layers),
               pretrain_image_size=28)
    vision = dict(model_type="sam3_vision_model", backbone_config=vit, fpn_hidden_size=v.hidden)
    small = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_layers=1)
    detector = dict(vision_config=vision, geometry_encoder_config=small, detr_encoder_config=small,
                    detr_decoder_config=dict(small, num_queries=4), mask_decoder_config=dict(hidden_size=16,
                                                                                               num_attention_heads=2),
                    text_config=dict(model_type="clip_text_model", hidden_size=16, intermediate_size=32,
                                     projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=32))
    tracker = dict(vision_config=vision, prompt_encoder_config=dict(hidden_size=v.hidden),
                   mask_decoder_config=dict(hidden_size=v.hidden, mlp_dim=2 * v.hidden, num_attention_heads=2,
                                            iou_head_hidden_dim=v.hidden))
    return dict(detector_config=detector, tracker_config=tracker)


SAM3_VARIANTS: Dict[str, Sam3Variant] = {
    "sam3": Sam3Variant("SAM 3 (facebook/sam3, PE ViT 1024d x 32)", 1024, 32, 16, 4736, 24, (7, 15, 23, 31), 256),
    "tiny": Sam3Variant("SAM 3 smoke-test size (32d x 2, no released weights)", 32, 2, 2, 64, 2, (1,), 32),
}


def weights_file(checkpoint: str | Path) -> Path:
    """The weights file of ``teacher.checkpoint``: a folder's ``model.safetensors``, else the path itself."""
    path = Path(checkpoint)
    return path / "model.safetensors" if path.is_dir() else path


def detect_sam3_variant(state_dict: Mapping[str, torch.Tensor], source: str) -> str:
    """The variant of an official SAM 3 state_dict from its tensors (ViT width and depth); a CheckpointError
    naming what the file is otherwise (Meta's ``sam3.pt``, another teacher's checkpoint)."""
    if PATCH_KEY not in state_dict:
        if META_SAM3_KEY in state_dict:
            raise CheckpointError(f"{source} is Meta's own sam3.pt (the sam3 package's layout), which transformers "
                                  f"cannot load and ships no converter for; {_FIX}.")
        raise CheckpointError(f"{source} is {describe_file(state_dict)}, not SAM 3; the sam3 teacher needs the "
                              f"official Hugging Face release: {_FIX}.")
    width = int(state_dict[PATCH_KEY].shape[0])
    depth = len({k[len(BACKBONE):].split(".")[1] for k in state_dict if k.startswith(BACKBONE + "layers.")})
    for name, v in SAM3_VARIANTS.items():
        if (v.width, v.depth) == (width, depth):
            return name
    known = ", ".join(f"{n} ({v.width}d x {v.depth})" for n, v in SAM3_VARIANTS.items())
    raise CheckpointError(f"{source} is a SAM 3 of unknown size (ViT {width}d x {depth} layers); known: {known}.")


def file_config(path: Path, variant: str, input_size: int) -> Any:
    """``Sam3VideoConfig`` from the ``config.json`` beside ``path``, at ``input_size``; it must describe
    ``variant``'s ViT (the file's config is what the model is built from)."""
    from transformers import Sam3VideoConfig

    config_json = path.parent / "config.json"
    if not config_json.is_file():
        raise CheckpointError(f"{config_json} not found: a SAM 3 model.safetensors needs the config.json of its "
                              f"release beside it; {_FIX}.")
    kind = json.loads(config_json.read_text()).get("model_type")
    if kind != "sam3_video":
        raise CheckpointError(f"{config_json} is a '{kind}' config, not facebook/sam3's 'sam3_video'; {_FIX}.")
    config = Sam3VideoConfig.from_json_file(str(config_json))
    vit, want = config.detector_config.vision_config.backbone_config, SAM3_VARIANTS[variant]
    if (vit.hidden_size, vit.num_hidden_layers) != (want.width, want.depth):
        raise CheckpointError(f"{config_json} describes a ViT {vit.hidden_size}d x {vit.num_hidden_layers} but the "
                              f"weights are {variant} ({want.width}d x {want.depth}); use the release's own config.")
    config.image_size = input_size
    return config


def official_state_dict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                        path: Path) -> Dict[str, torch.Tensor]:
    """``module``'s state_dict from the official file's keys (:data:`KEY_MAP`); CheckpointError listing
    what the file lacks."""
    out, missing = {}, []
    for key in module.state_dict():
        mine, theirs = next((m, t) for m, t in KEY_MAP if key.startswith(m))
        src = theirs + key[len(mine):]
        if src in state_dict:
            out[key] = state_dict[src]
        else:
            missing.append(src)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} SAM 3 tensors (e.g. {', '.join(missing[:3])}); "
                              f"it is not a complete facebook/sam3 release: {_FIX}.")
    return out


@TEACHERS.register("sam3")
class Sam3Teacher(BaseTeacher):
    """Frozen SAM 3 image encoder and tracker decoder (see the module docstring for features and geometry)."""

    family = "sam3"
    primary_feature = "fpn_s14"
    can_segment = True
    variants = SAM3_VARIANTS
    default_variant = "sam3"
    preprocessing = "sam3:transformers-Sam3ImageProcessor,resize-square-no-aspect,bilinear,mean=0.500/0.500/0.500," \
                    "std=0.500/0.500/0.500"

    def __init__(self, variant: str = "auto", checkpoint: Optional[str] = None, input_size: int = 1008,
                 init: str = "pretrained", dtype: str = "auto", device: str = "auto", seed: int = 0) -> None:
        super().__init__()
        settings = self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                      dtype=dtype, device=device, seed=seed)
        dev = self._adopt(settings, "SAM 3")
        variant, self.spec = settings.variant, SAM3_VARIANTS[settings.variant]
        checkpoint = None if settings.checkpoint is None else str(weights_file(settings.checkpoint))

        def check(state_dict: Dict[str, torch.Tensor], file: Path) -> None:
            found = detect_sam3_variant(state_dict, f"checkpoint {file}")
            if found != variant:
                raise CheckpointError(f"checkpoint {file} is {SAM3_VARIANTS[found].label} but teacher.variant is "
                                      f"{variant}; set teacher.variant={found} or teacher.variant=auto.")

        state_dict, self._weights_id = load_teacher_weights("SAM 3", "sam3", variant, checkpoint, init, seed, check)
        path = None if state_dict is None else checkpoint_path("sam3", variant, checkpoint)
        config = self.spec.video_config(input_size) if path is None else file_config(path, variant, input_size)
        from transformers import Sam3ImageProcessor, Sam3TrackerModel
        from transformers.models.sam3.modeling_sam3 import Sam3VisionNeck

        with seeded(seed):  # random weights from `seed` alone: the cache tool and a live pass agree
            self.tracker = Sam3TrackerModel(config)  # ViT + tracker neck + prompt encoder + mask decoder
            self.detector_neck = Sam3VisionNeck(config.detector_config.vision_config)
        if state_dict is not None:
            self.load_state_dict(official_state_dict(self, state_dict, path), strict=True)
            logger.info("Loaded SAM 3 checkpoint from: %s", path)
        self._processor = Sam3ImageProcessor(size={"height": input_size, "width": input_size})
        if tuple(self._processor.image_mean) != MEAN or tuple(self._processor.image_std) != STD:
            raise ConfigError(f"transformers' Sam3ImageProcessor normalises with mean {self._processor.image_mean}, "
                              f"std {self._processor.image_std}, not the recorded {MEAN}/{STD}: install the pinned "
                              "transformers (requirements.txt).")
        self._mean, self._std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        self.to(dev)
        self.freeze()

    # ------------------------------------------------------------------ settings
    @classmethod
    def _auto_variant(cls, values: Mapping[str, Any]) -> Tuple[str, str, Optional[str]]:
        """The shared rule on the weights FILE of ``teacher.checkpoint`` (a folder means its model.safetensors)."""
        checkpoint = values.get("checkpoint")
        file = None if checkpoint is None else str(weights_file(checkpoint))
        return auto_variant(cls.family, cls.default_variant, file, values.get("init", "pretrained"), cls.detect_variant)

    @classmethod
    def _config_weights_id(cls, settings: TeacherSettings) -> str:
        checkpoint = None if settings.checkpoint is None else str(weights_file(settings.checkpoint))
        return config_weights_id(cls.family, settings.variant, checkpoint, settings.init, settings.seed)

    @classmethod
    def detect_variant(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> str:
        return detect_sam3_variant(state_dict, source)

    @classmethod
    def _input_multiple(cls, settings: TeacherSettings) -> Tuple[int, str]:
        return _SIZE_MULTIPLE, "SAM 3's patch 14 and its stride-28 FPN level; official: 1008"

    # ------------------------------------------------------------------ geometry
    @property
    def input_size(self) -> int:
        return self.settings.input_size

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        dec = self.tracker.mask_decoder
        return (FeatureSpec("patch_tokens", self.spec.width, 14), FeatureSpec("fpn_s7", self.spec.hidden, 7),
                FeatureSpec("fpn_s14", self.spec.hidden, 14), FeatureSpec("fpn_s28", self.spec.hidden, 28),
                FeatureSpec("tracker_s14", self.spec.hidden, 14),
                FeatureSpec("tracker_hires_s7", dec.conv_s1.out_channels, 7),
                FeatureSpec("tracker_hires_packed_s7", 4 * dec.conv_s0.out_channels, 7))

    @classmethod
    def input_affine(cls, height: int, width: int, input_size: int) -> Tuple[float, float, float, float]:
        """SAM 3 stretches every image to a square: (S/w, S/h, 0, 0)."""
        return (input_size / width, input_size / height, 0.0, 0.0)

    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """RGB uint8 ``(H_i, W_i, 3)`` images -> pixels ``(B, 3, S, S)`` float32 on CPU by transformers'
        ``Sam3ImageProcessor``, affine ``(B, 4)`` = (S/w, S/h, 0, 0), valid_hw ``(B, 2)`` = (S, S)."""
        check_rgb_images(images, "Sam3Teacher")
        s = self.input_size
        pixels = self._processor(images=[np.array(i) for i in images], return_tensors="pt").pixel_values
        affine = torch.tensor([self.input_affine(*img.shape[:2], s) for img in images], dtype=torch.float32)
        valid = torch.full((len(images), 2), s, dtype=torch.long)
        return TeacherBatch(pixels=pixels.float(), affine=affine, valid_hw=valid)

    @torch.no_grad()
    def preprocess_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """:meth:`preprocess` on the device: each content box of the canvases ``(B, 3, H, W)`` stretched to
        S x S (bilinear, antialiased) and normalised; affine ``(B, 4)`` = (S/w, S/h, 0, 0) of the crop."""
        s = self.input_size
        return self._resize_crops(images, boxes, lambda h, w: (s, s), "bilinear", self._mean, self._std)

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> the maps of :meth:`feature_specs`, float32, from one ViT pass and both necks
        (what ``Sam3VisionModel.forward`` does with each neck)."""
        s = self.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"Sam3Teacher expects pixels (B, 3, {s}, {s}), got {tuple(pixels.shape)}.")
        enc, dec, g = self.tracker.vision_encoder, self.tracker.mask_decoder, s // 14
        with self.autocast():
            tokens = enc.backbone(pixels.to(self.device)).last_hidden_state  # (B, g*g, C)
            grid = tokens.view(tokens.shape[0], g, g, -1).permute(0, 3, 1, 2)
            det = self.detector_neck(grid)[0]
            trk = enc.neck(grid)[0]
            maps = {"patch_tokens": grid, "fpn_s7": det[1], "fpn_s14": det[2], "fpn_s28": det[3],
                    "tracker_s14": trk[2], "tracker_hires_s7": dec.conv_s1(trk[1]),
                    "tracker_hires_packed_s7": F.pixel_unshuffle(dec.conv_s0(trk[0]), 2)}
        return {k: v.float().contiguous() for k, v in maps.items()}

    @torch.no_grad()
    def mask_logits(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor,
                    batch_idx: torch.Tensor) -> torch.Tensor:
        """Box prompts -> (N, S/4, S/4) float32 mask logits by the tracker's own prompt encoder and mask
        decoder, fed as ``Sam3TrackerModel.forward`` feeds them: image embedding ``tracker_s14 +
        no_memory_embedding``, high-resolution features [conv_s0 level (unpacked), ``tracker_hires_s7``],
        ``multimask_output=False``. The decoder's masks have S/3.5 cells; they are resampled (bilinear) to the
        S/4 grid every vfmkd mask cache uses, and clamped to [-32, 32] like SAM2's predictor."""
        model = self.tracker
        emb = features["tracker_s14"].to(self.device) + model.no_memory_embedding.view(1, -1, 1, 1)
        high = [F.pixel_shuffle(features["tracker_hires_packed_s7"].to(self.device), 2),
                features["tracker_hires_s7"].to(self.device)]
        side = self.input_size // 4
        out = torch.zeros(len(boxes), side, side, dtype=torch.float32, device=self.device)
        pe = model.get_image_wide_positional_embeddings()
        xyxy = boxes.to(self.device, torch.float32)
        with self.autocast():
            for b, rows in enumerate(self._boxes_by_image(boxes, batch_idx, emb.shape[0])):
                for chunk in rows.split(MASK_CHUNK) if len(rows) else ():
                    chunk = chunk.to(self.device)
                    sparse, dense = model.prompt_encoder(input_points=None, input_labels=None,
                                                         input_boxes=xyxy[chunk][None], input_masks=None)
                    low_res = model.mask_decoder(image_embeddings=emb[b:b + 1], image_positional_embeddings=pe,
                                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                 multimask_output=False,
                                                 high_resolution_features=[h[b:b + 1] for h in high])[0]
                    low_res = F.interpolate(low_res[0].float(), size=(side, side), mode="bilinear",
                                            align_corners=False)
                    out[chunk] = low_res[:, 0].clamp(-32.0, 32.0)
        return out
