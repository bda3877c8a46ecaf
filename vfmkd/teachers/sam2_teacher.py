"""SAM2 / SAM2.1 (Hiera image encoder) as a frozen teacher, built on Meta's real ``sam2`` package.

The model comes from the package's own builder (``sam2.build_sam.build_sam2`` with the package's
Hydra config, e.g. ``configs/sam2.1/sam2.1_hiera_t.yaml``); the weights are loaded here, safely:
the official checkpoint layout ``{"model": state_dict}`` goes through
:func:`vfmkd.utils.checkpoint.load_checkpoint` (``weights_only=True``) and a strict
``load_state_dict``, after the file's Hiera size and SAM2 version were recognised from its tensor
shapes. Prompted masks come from the package's ``SAM2ImagePredictor``.

Features for a ``(B, 3, S, S)`` batch (``S = input_size``), all from ONE pass of
``model.image_encoder`` (Hiera trunk + FPN neck; the stride-32 level is dropped by SAM2's
``scalp=1``):

* ``fpn_s4`` ``(B, 256, S/4, S/4)``, ``fpn_s8`` ``(B, 256, S/8, S/8)``: the neck's raw
  ``backbone_fpn`` levels 0 and 1 (lateral only, no top-down path);
* ``fpn_s16`` ``(B, 256, S/16, S/16)``: ``backbone_fpn[2]`` = ``vision_features`` (with the top-down
  path from stride 32). The primary feature. SAM2's image predictor feeds the mask decoder with
  ``fpn_s16 + model.no_mem_embed`` (a constant per-channel offset);
* ``hires_s4`` ``(B, 32, S/4, S/4)`` = ``sam_mask_decoder.conv_s0(fpn_s4)`` and ``hires_s8``
  ``(B, 64, S/8, S/8)`` = ``sam_mask_decoder.conv_s1(fpn_s8)``: the mask decoder's high-resolution
  projections. ``SAM2Base.forward_image`` (and so the predictor) REPLACES ``backbone_fpn[0]/[1]`` by
  these; vfmkd keeps both the raw levels and the projections, under distinct names.

Per image at S=1024 in float16: fpn_s16 2 MiB, fpn_s8 8 MiB, fpn_s4 32 MiB, hires_s8 2 MiB,
hires_s4 4 MiB (the cache tool stores only the primary map unless ``--features`` says otherwise).

Preprocessing is SAM2's (``sam2/utils/transforms.py``, ``SAM2Transforms``): the image is resized to a
square ``S x S`` WITHOUT keeping its aspect ratio (torchvision ``Resize((S, S))``: bilinear,
antialiased), scaled to [0, 1] and normalised with the ImageNet mean/std. So there is no padding:
``affine`` = (S / w, S / h, 0, 0) (``sx != sy`` for non-square images) and ``valid_hw`` = (S, S).

Input size: any positive multiple of 32 (Hiera: stride-4 patch embedding, three 2x query poolings,
and the stride-4 window position embedding tiles 8x8 windows); the official weights are trained at
1024. SAM2 interpolates Hiera's background position embedding to the input grid itself, and the
prompt encoder is built for ``S`` through the config override ``++model.image_size=S``.

Hydra: importing ``sam2`` initialises a process-global Hydra instance on the package's configs
(``initialize_config_module("sam2")``) and registers OmegaConf resolvers (``now``, ``hydra``,
``python_version``). vfmkd itself never uses Hydra (its configs are plain OmegaConf), so ``sam2`` is
imported lazily, only when a SAM2 teacher is built. If the global Hydra belongs to someone else (an
application started with ``@hydra.main``) or was cleared, the model is composed inside a temporary
``initialize_config_module("sam2")`` context and the previous Hydra state is restored afterwards.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.official_weights import weights_for
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.base import MASK_CHUNK, BaseTeacher, TeacherBatch, TeacherSettings, check_rgb_images
from vfmkd.teachers.loading import checkpoint_path, load_teacher_weights, seeded

logger = logging.getLogger("vfmkd")

#: variant -> (the sam2 package's Hydra config, the official checkpoint's file name)
SAM2_VARIANTS: Dict[str, Tuple[str, str]] = {
    "sam2.1_hiera_tiny": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_small": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_base_plus": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_large": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
    "sam2_hiera_tiny": ("configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt"),
    "sam2_hiera_small": ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt"),
    "sam2_hiera_base_plus": ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt"),
    "sam2_hiera_large": ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt"),
}
#: Hiera size -> (embed dim of the first stage, number of blocks), from the configs above
HIERA_SIZES: Dict[str, Tuple[int, int]] = {
    "tiny": (96, 12), "small": (96, 16), "base_plus": (112, 24), "large": (144, 48),
}
# SAM2's normalisation (SAM2Transforms.mean/std, on [0, 1] pixels)
SAM2_MEAN = (0.485, 0.456, 0.406)
SAM2_STD = (0.229, 0.224, 0.225)
_SIZE_MULTIPLE = 32
_PATCH_KEY = "image_encoder.trunk.patch_embed.proj.weight"
_SAM1_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
# keys only SAM2.1 has (no_obj_embed_spatial: true, proj_tpos_enc_in_obj_ptrs: true in its configs)
_SAM21_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")
_FEATURES = (("fpn_s4", 256, 4), ("fpn_s8", 256, 8), ("fpn_s16", 256, 16), ("hires_s4", 32, 4), ("hires_s8", 64, 8))
_fmt = lambda t: "/".join(f"{v:.3f}" for v in t)  # noqa: E731
_INSTALL_HINT = (
    "install it the way scripts/setup.sh does: "
    "SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0 "
    "(its dependencies hydra-core and iopath are pinned in requirements.txt)"
)




def _version_and_size(variant: str) -> Tuple[str, str]:
    """``sam2.1_hiera_base_plus`` -> (``sam2.1``, ``base_plus``)."""
    version, size = variant.split("_hiera_")
    return version, size


def detect_sam2_variant(state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """The ``variant`` (e.g. ``sam2.1_hiera_tiny``) a SAM2 state_dict belongs to, from its keys and
    tensor shapes only: Hiera embed dim and block count give the size, SAM2.1-only keys the version."""
    if _PATCH_KEY not in state_dict:
        if _SAM1_PATCH_KEY in state_dict:
            raise CheckpointError(
                f"{source} is a SAM (segment-anything v1) checkpoint, not SAM2: use it with the 'sam' teacher "
                "(type: sam), or give this teacher a SAM2 checkpoint (python tools/download_weights.py --list)."
            )
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"{source} is not a SAM2 state_dict: it has no '{_PATCH_KEY}' (first keys: {sample}). "
            "Use an official SAM2/SAM2.1 checkpoint (python tools/download_weights.py --list)."
        )
    dim = int(state_dict[_PATCH_KEY].shape[0])
    depth = len({int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k))})
    version = "sam2.1" if any(k in state_dict for k in _SAM21_KEYS) else "sam2"
    for size, shape in HIERA_SIZES.items():
        if shape == (dim, depth):
            return f"{version}_hiera_{size}"
    raise CheckpointError(
        f"{source} has a SAM2 Hiera image encoder of unknown size (embed dim {dim}, {depth} blocks); "
        f"known: {', '.join(f'{n}={d}x{b}' for n, (d, b) in HIERA_SIZES.items())}."
    )


def _describe(variant: str) -> str:
    version, size = _version_and_size(variant)
    dim, depth = HIERA_SIZES[size]
    return f"{version.upper()} Hiera-{size} (embed dim {dim}, {depth} blocks)"


def _import_sam2():
    try:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except ImportError as err:
        raise ConfigError(f"the SAM2 teacher needs Meta's sam2 package ({err}); {_INSTALL_HINT}.") from None
    return build_sam2, SAM2ImagePredictor


def build_sam2_model(config: str, image_size: int) -> torch.nn.Module:
    """``sam2.build_sam.build_sam2(config, ckpt_path=None, device="cpu")`` at ``image_size``, with the
    package's own Hydra config, whatever state the process-global Hydra is in (see module doc)."""
    build_sam2, _ = _import_sam2()
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    overrides = [f"++model.image_size={image_size}"]
    if GlobalHydra.instance().is_initialized():
        try:
            return build_sam2(config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
        except MissingConfigException:
            # The global Hydra searches another application's configs, not sam2's: fall through
            # and build inside sam2's own Hydra context below.
            pass
    from hydra import initialize_config_module
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sam2", version_base="1.2"):  # what `import sam2` does
            return build_sam2(config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    finally:
        restore_gh_from_backup(backup)


@TEACHERS.register("sam2")
class Sam2Teacher(BaseTeacher):
    """Frozen SAM2 / SAM2.1 image encoder (see the module docstring for features and geometry)."""

    family = "sam2"
    primary_feature = "fpn_s16"
    can_segment = True

    variants = SAM2_VARIANTS
    default_variant = "sam2.1_hiera_tiny"
    preprocessing = f"sam2:resize-square-no-aspect,bilinear-antialias,mean={_fmt(SAM2_MEAN)},std={_fmt(SAM2_STD)}"

    def __init__(
        self,
        variant: str = "auto",
        checkpoint: Optional[str] = None,
        input_size: int = 1024,
        init: str = "pretrained",
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        settings = self.settings_from(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                                      dtype=dtype, device=device, seed=seed)
        dev = self._adopt(settings, "SAM2")
        variant = settings.variant  # `auto` resolved from the weights file
        config, _ = SAM2_VARIANTS[variant]

        def check(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
            found = detect_sam2_variant(state_dict, source=f"checkpoint {path}")
            if found != variant:
                raise CheckpointError(
                    f"checkpoint {path} is a {_describe(found)} model but teacher.variant is {variant} "
                    f"({_describe(variant)}); set teacher.variant={found} or teacher.variant=auto (or use the "
                    f"{variant} checkpoint: `{weights_for('sam2', variant).download_command}`)."
                )

        path = checkpoint_path("sam2", variant, checkpoint)
        state_dict, self._weights_id = load_teacher_weights("SAM2", "sam2", variant, checkpoint, init, seed, check)

        # Random weights come from `seed` alone, so the cache tool and a later live pass agree.
        with seeded(seed):
            self.sam2 = build_sam2_model(config, input_size)
        if state_dict is not None:
            try:
                self.sam2.load_state_dict(state_dict, strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"checkpoint {path} does not fit SAM2 {variant}: {err}") from None
            logger.info("Loaded SAM2 checkpoint from: %s", path)
        enc = self.sam2.image_encoder
        if len(enc.neck.backbone_channel_list) - enc.scalp != 3 or not self.sam2.use_high_res_features_in_sam:
            raise ConfigError(f"{config}: expected 3 FPN levels and high-res decoder features (official SAM2 layout).")

        self._mean = torch.tensor(SAM2_MEAN).view(3, 1, 1)
        self._std = torch.tensor(SAM2_STD).view(3, 1, 1)
        self._predictor = None
        self._predictor_key: Optional[str] = None
        self.to(dev)
        self.freeze()

    # ------------------------------------------------------------------ geometry
    @property
    def input_size(self) -> int:
        return self.settings.input_size

    @classmethod
    def detect_variant(cls, state_dict: Dict[str, torch.Tensor], source: str) -> str:
        return detect_sam2_variant(state_dict, source)

    @classmethod
    def _input_multiple(cls, settings: TeacherSettings) -> Tuple[int, str]:
        return _SIZE_MULTIPLE, ("SAM2's Hiera encoder: stride-4 patches, three 2x poolings, 8x8 windows at stride 4; "
                                "common: 256, 512, 768, 1024 = the official training size")

    def feature_specs(self) -> Tuple[FeatureSpec, ...]:
        return tuple(FeatureSpec(n, c, s) for n, c, s in _FEATURES)

    @classmethod
    def input_affine(cls, height: int, width: int, input_size: int) -> Tuple[float, float, float, float]:
        """SAM2 stretches every image to a square: (S/w, S/h, 0, 0)."""
        return (input_size / width, input_size / height, 0.0, 0.0)

    def preprocess(self, images: Sequence[np.ndarray]) -> TeacherBatch:
        """RGB uint8 ``(H_i, W_i, 3)`` images -> pixels ``(B, 3, S, S)`` float32 on CPU (SAM2Transforms:
        ToTensor, Resize((S, S)) bilinear antialiased, Normalize), affine ``(B, 4)`` = (S/w, S/h, 0, 0),
        valid_hw ``(B, 2)`` = (S, S): the whole canvas is image."""
        check_rgb_images(images, "Sam2Teacher")
        s = self.input_size
        pixels = torch.empty(len(images), 3, s, s)
        affine = torch.zeros(len(images), 4)
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)  # a copy: inputs may be read-only
            x = TF.resize(x, [s, s], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            pixels[i] = (x - self._mean) / self._std
            affine[i] = torch.tensor([s / w, s / h, 0.0, 0.0])
        valid = torch.full((len(images), 2), s, dtype=torch.long)
        return TeacherBatch(pixels=pixels, affine=affine, valid_hw=valid)

    @torch.no_grad()
    def preprocess_crops(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """:meth:`preprocess` on the device: canvases ``(B, 3, H, W)`` in [0, 1] and content boxes
        ``(B, 4)`` -> pixels ``(B, 3, S, S)`` (each crop stretched to S x S, bilinear antialiased: the op
        torchvision's ``Resize`` runs on a tensor), affine ``(B, 4)`` = (S/w, S/h, 0, 0) of the crop,
        valid_hw ``(B, 2)`` = (S, S), all on ``images.device``."""
        s = self.input_size
        return self._resize_crops(images, boxes, lambda h, w: (s, s), "bilinear", self._mean, self._std)

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, 3, S, S)`` -> the five maps of :meth:`feature_specs`, float32, from one encoder pass."""
        s = self.input_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"Sam2Teacher expects pixels (B, 3, {s}, {s}), got {tuple(pixels.shape)}.")
        dec = self.sam2.sam_mask_decoder
        with self.autocast():
            out = self.sam2.image_encoder(pixels.to(self.device))
            s4, s8, s16 = out["backbone_fpn"]  # raw neck levels: forward_image would overwrite s4/s8
            hires_s4, hires_s8 = dec.conv_s0(s4), dec.conv_s1(s8)
        maps = {"fpn_s4": s4, "fpn_s8": s8, "fpn_s16": s16, "hires_s4": hires_s4, "hires_s8": hires_s8}
        return {k: v.float().contiguous() for k, v in maps.items()}

    # ------------------------------------------------------------------ prompting
    @torch.no_grad()
    def mask_logits(self, features: Dict[str, torch.Tensor], boxes: torch.Tensor,
                    batch_idx: torch.Tensor) -> torch.Tensor:
        """Box prompts -> (N, S/4, S/4) float32 mask logits, by SAM2's own ``sam_prompt_encoder`` and
        ``sam_mask_decoder`` on the features its image predictor uses: image embedding ``fpn_s16 +
        no_mem_embed`` (``directly_add_no_mem_embed``) and high-resolution features ``[hires_s4,
        hires_s8]``. A box is prompted as SAM2ImagePredictor does (two corner points labelled 2 and 3);
        ``multimask_output=False``; the logits are clamped to [-32, 32] like the predictor's
        ``low_res_masks``. ``boxes`` (N, 4) x1, y1, x2, y2 in teacher pixels (SAM2's stretched square
        canvas), ``batch_idx`` (N,) int64."""
        model = self.sam2
        emb = features["fpn_s16"].to(self.device)
        if model.directly_add_no_mem_embed:
            emb = emb + model.no_mem_embed.view(1, -1, 1, 1)
        high = [features["hires_s4"].to(self.device), features["hires_s8"].to(self.device)]
        side = 4 * emb.shape[-1]
        per_image = self._boxes_by_image(boxes, batch_idx, emb.shape[0])
        out = torch.zeros(len(boxes), side, side, dtype=torch.float32, device=self.device)
        pe_enc, dec = model.sam_prompt_encoder, model.sam_mask_decoder
        dense_pe = pe_enc.get_dense_pe()
        corners = boxes.to(self.device, torch.float32).reshape(-1, 2, 2)
        with self.autocast():
            for b, rows in enumerate(per_image):
                for chunk in rows.split(MASK_CHUNK) if len(rows) else ():
                    chunk = chunk.to(self.device)
                    labels = torch.tensor([[2, 3]], dtype=torch.int, device=self.device).repeat(len(chunk), 1)
                    sparse, dense = pe_enc(points=(corners[chunk], labels), boxes=None, masks=None)
                    low_res, _, _, _ = dec(image_embeddings=emb[b:b + 1], image_pe=dense_pe,
                                           sparse_prompt_embeddings=sparse,
                                           dense_prompt_embeddings=dense, multimask_output=False,
                                           repeat_image=len(chunk) > 1, high_res_features=[h[b:b + 1] for h in high])
                    out[chunk] = low_res[:, 0].float().clamp(-32.0, 32.0)
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
        """Segment ``image`` (RGB uint8 (H, W, 3)) with SAM2's own ``SAM2ImagePredictor`` on this model.

        ``boxes``: (4,) or (K, 4) XYXY in original pixels; ``points``: (P, 2) XY with ``point_labels``
        (P,) 1=foreground/0=background (default all 1); points apply to every box.
        Returns ``masks`` bool (N, H, W), ``scores`` float32 (N,), ``low_res_logits`` float32
        (N, S/4, S/4) with N = K * C, box-major, C = 3 if ``multimask_output`` else 1 (K = 1 without boxes).
        """
        if boxes is None and points is None:
            raise ValueError("predict_masks needs boxes and/or points.")
        pred = self._predictor_for(image)
        coords = labels = box = None
        k = 1
        if boxes is not None:
            box = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            k = len(box)
        if points is not None:
            coords = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            labels = np.ones(len(coords),
                             dtype=np.int32) if point_labels is None else np.asarray(point_labels).reshape(-1)
            if len(labels) != len(coords):
                raise ValueError(f"{len(coords)} points but {len(labels)} point_labels.")
            if k > 1:  # the predictor pairs points and boxes row by row
                coords = np.broadcast_to(coords, (k, *coords.shape)).copy()
                labels = np.broadcast_to(labels, (k, *labels.shape)).copy()
        with self.autocast():
            masks, scores, low_res = pred.predict(
                point_coords=coords, point_labels=labels, box=box, multimask_output=multimask_output
            )
        h, w = image.shape[:2]
        return (
            masks.reshape(-1, h, w) > 0,
            np.asarray(scores, dtype=np.float32).reshape(-1),
            np.asarray(low_res, dtype=np.float32).reshape(-1, *low_res.shape[-2:]),
        )

    def _predictor_for(self, image: np.ndarray):
        """A SAM2ImagePredictor with ``image`` set; the embedding is reused while the same image is prompted."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("predict_masks expects an RGB uint8 array (H, W, 3).")
        if self._predictor is None:
            _, predictor_cls = _import_sam2()
            self._predictor = make_predictor(predictor_cls, self.sam2, self.input_size)
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() + str(image.shape)
        if key != self._predictor_key or not self._predictor._is_image_set:
            with self.autocast():
                self._predictor.set_image(image)
            self._predictor_key = key
        return self._predictor


def make_predictor(predictor_cls, model: torch.nn.Module, input_size: int):
    """``SAM2ImagePredictor(model)`` whose backbone feature sizes follow ``input_size`` (the package
    hard-codes those of 1024: 256/128/64)."""
    pred = predictor_cls(model)
    pred._bb_feat_sizes = [(input_size // 4,) * 2, (input_size // 8,) * 2, (input_size // 16,) * 2]
    return pred
