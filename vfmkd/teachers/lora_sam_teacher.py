"""SAM with LoRA adapters on its image encoder's ``qkv`` projections, as a frozen teacher.

For users who fine-tuned SAM with LoRA on their own domain (ultrasound, microscopy, ...): the base
SAM is loaded exactly like the ``sam`` teacher (this class subclasses :class:`SamTeacher`: same
checkpoint checks, preprocessing, features, ``predict_masks``), then the LoRA matrices are MERGED
into the ``qkv`` weights once (``W <- W + (lora_alpha / lora_rank) * B @ A``), so the forward pass,
its cost and SAM's own predictor are unchanged, and the teacher stays frozen.

LoRA file format (defined by vfmkd). A ``torch.save``-d dict of tensors (plain, or wrapped as
``{"model": sd}`` / ``{"state_dict": sd}``), loaded with ``weights_only=True``, holding for EVERY
image-encoder block ``i`` (vit_b: 0..11, vit_l: 0..23, vit_h: 0..31) exactly two tensors::

    image_encoder.blocks.{i}.attn.qkv.lora_A    (r, C)      float
    image_encoder.blocks.{i}.attn.qkv.lora_B    (3 * C, r)  float

with ``C`` the embed dim (vit_b 768, vit_l 1024, vit_h 1280) and ``r`` = ``teacher.lora_rank``. The
adapted projection is ``qkv(x) = x W^T + b + (lora_alpha / r) * x A^T B^T`` (the PEFT convention:
``lora_A.weight`` is ``(r, in)``, ``lora_B.weight`` ``(out, r)``, scaling ``alpha / r``); the ``3C``
rows of ``B`` are ordered q, k, v like SAM's fused ``qkv`` Linear. ``lora_alpha`` is not stored in the
file: set ``teacher.lora_alpha`` to the value used in training. Conversions:

* PEFT (``get_peft_model_state_dict``): rename
  ``base_model.model.image_encoder.blocks.{i}.attn.qkv.lora_{A,B}.weight`` to the keys above.
* Separate q/v adapters of rank ``r`` (SAMed style, ``A_q, B_q, A_v, B_v``, scaling 1): a fused
  adapter of rank ``2r``: ``A = cat([A_q, A_v])``, ``B = [[B_q, 0], [0, 0], [0, B_v]]`` (q, k, v row
  blocks), with ``lora_rank = lora_alpha = 2r``.

Every mismatch with the base model (number of blocks, dims, rank vs ``teacher.lora_rank``, a missing
``lora_B``, foreign keys, a full SAM checkpoint given as the LoRA file) is a :class:`CheckpointError`
that says what differs, raised before the base model is built.

Fingerprint: family ``lora_sam``, variant ``<variant>+lora_r<rank>_a<alpha>`` (e.g.
``vit_b+lora_r8_a8``), weights ``<base sha256>+<LoRA file sha256>`` (``random-init:seedN+...`` with
``init=random``; ``...+no-lora`` when no LoRA file is given, only allowed with ``init=random``).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.core.sam_variants import SAM_VARIANTS
from vfmkd.teachers.base import TeacherFingerprint
from vfmkd.teachers.loading import auto_variant, config_weights_id
from vfmkd.teachers.sam_teacher import SamTeacher, wrong_variant_error
from vfmkd.teachers.settings import TeacherSettings
from vfmkd.utils.checkpoint import load_checkpoint, sha256_of_file, unwrap_state_dict

logger = logging.getLogger("vfmkd")

_LORA_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.lora_([AB])$")
_KEY_FORMAT = "image_encoder.blocks.{i}.attn.qkv.lora_A (r, C) and .lora_B (3C, r)"
_SAM_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_NO_LORA = "no-lora"


def lora_key(block: int, which: str) -> str:
    """The key of block ``block``'s ``which`` (``"A"`` or ``"B"``) matrix in a LoRA file."""
    return f"image_encoder.blocks.{block}.attn.qkv.lora_{which}"


def _ranges(blocks: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: List[str] = []
    for b in sorted(blocks):
        if out and b == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ", ".join(out)


def lora_base_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The SAM size (vit_b|vit_l|vit_h) whose blocks and embed dim a LoRA file's ``lora_A`` matrices
    fit, or None when they fit none (:func:`check_lora_state_dict` then says what differs)."""
    dims: Dict[int, int] = {}
    for key, value in state_dict.items():
        m = _LORA_RE.match(key)
        if m and m.group(2) == "A" and getattr(value, "ndim", 0) == 2:
            dims[int(m.group(1))] = int(value.shape[1])
    for name, (dim, depth) in SAM_VARIANTS.items():
        if sorted(dims) == list(range(depth)) and set(dims.values()) == {dim}:
            return name
    return None


def check_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor], variant: str, rank: int, source: str = "LoRA checkpoint"
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Validate a LoRA file against SAM ``variant`` and ``rank``; returns ``[(A, B)]`` per block
    (float32). Raises :class:`CheckpointError` naming what does not match."""
    pairs = _lora_pairs(state_dict, source)
    _check_fits_base(pairs, variant, rank, source)
    _check_ranks(pairs, variant, rank, source)
    bad = [i for i, d in sorted(pairs.items()) if not (torch.isfinite(d["A"]).all() and torch.isfinite(d["B"]).all())]
    if bad:
        raise CheckpointError(f"{source} holds NaN/inf values in blocks {_ranges(bad)}.")
    return [(pairs[i]["A"].float(), pairs[i]["B"].float()) for i in range(SAM_VARIANTS[variant][1])]


def _lora_pairs(state_dict: Mapping[str, torch.Tensor], source: str) -> Dict[int, Dict[str, torch.Tensor]]:
    """``{block: {"A": (r, C), "B": (3C, r)}}`` of a LoRA file: every key a qkv LoRA matrix, both halves
    present, 2-D float tensors."""
    pairs: Dict[int, Dict[str, torch.Tensor]] = {}
    foreign: List[str] = []
    for key, value in state_dict.items():
        m = _LORA_RE.match(key)
        if m:
            pairs.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            foreign.append(key)
    if not pairs:
        if _SAM_PATCH_KEY in state_dict:
            raise CheckpointError(
                f"{source} is a full SAM state_dict, not a LoRA file: use it as the base (teacher.checkpoint, or "
                f"the 'sam' teacher); teacher.lora_checkpoint takes only the LoRA matrices, {_KEY_FORMAT}."
            )
        raise CheckpointError(
            f"{source} holds no LoRA matrices for SAM's qkv layers (first keys: {', '.join(list(state_dict)[:5])}); "
            f"expected {_KEY_FORMAT} for every image-encoder block (format: vfmkd/teachers/lora_sam_teacher.py)."
        )
    if foreign:
        raise CheckpointError(
            f"{source} has {len(foreign)} key(s) that are not qkv LoRA matrices (e.g. {', '.join(foreign[:3])}); "
            f"a LoRA file holds only {_KEY_FORMAT} (format: vfmkd/teachers/lora_sam_teacher.py)."
        )
    half = {i: "A" if "A" in d else "B" for i, d in pairs.items() if len(d) != 2}
    if half:
        i, have = next(iter(sorted(half.items())))
        miss = "B" if have == "A" else "A"
        raise CheckpointError(
            f"{source}: block {i} has lora_{have} but no lora_{miss} ('{lora_key(i, miss)}' is missing"
            + (f"; also incomplete: blocks {_ranges(list(half))}" if len(half) > 1 else "") + ")."
        )
    for i, d in sorted(pairs.items()):
        for which, t in d.items():
            if not torch.is_floating_point(t) or t.ndim != 2:
                raise CheckpointError(
                    f"{source}: '{lora_key(i, which)}' is a {t.dtype} tensor of shape {tuple(t.shape)}; "
                    "LoRA matrices are 2-D float tensors."
                )
    return pairs


def _check_fits_base(pairs: Dict[int, Dict[str, torch.Tensor]], variant: str, rank: int, source: str) -> None:
    """Does the file fit this base model at all (number of blocks, embed dim)?"""
    dim, depth = SAM_VARIANTS[variant]
    blocks = sorted(pairs)
    in_dims = sorted({int(d["A"].shape[1]) for d in pairs.values()})
    problems = []
    if blocks != list(range(depth)):
        missing = sorted(set(range(depth)) - set(blocks))
        extra = [b for b in blocks if b >= depth]
        detail = "; ".join(
            s for s in (f"missing blocks {_ranges(missing)}" if missing else "",
                        f"blocks {_ranges(extra)} do not exist" if extra else "") if s
        )
        problems.append(
            f"it has adapters for {len(blocks)} blocks ({_ranges(blocks)}) but SAM {variant} has {depth} "
            f"image-encoder blocks (0-{depth - 1}): {detail}"
        )
    if in_dims != [dim]:
        problems.append(
            f"its lora_A matrices take {'/'.join(map(str, in_dims))} input features but {variant}'s qkv "
            f"layers take {dim} (embed dim)"
        )
    if problems:
        guess = [n for n,
                 (d, b) in SAM_VARIANTS.items() if in_dims == [d] and len(blocks) == b and blocks == list(range(b))]
        hint = (f" It was trained on a SAM {guess[0]}: set teacher.variant={guess[0]} with the {guess[0]} base "
                "checkpoint." if guess else f" A LoRA for {variant} has {depth} blocks with lora_A ({rank}, {dim}).")
        raise CheckpointError(f"{source} does not match the base SAM {variant}: {'; '.join(problems)}.{hint}")


def _check_ranks(pairs: Dict[int, Dict[str, torch.Tensor]], variant: str, rank: int, source: str) -> None:
    """Every lora_B fits its lora_A and qkv's 3C outputs; one rank, the configured one."""
    dim = SAM_VARIANTS[variant][0]
    ranks: Dict[int, List[int]] = {}
    for i, d in sorted(pairs.items()):
        a, b = d["A"], d["B"]
        if tuple(b.shape) != (3 * dim, a.shape[0]):
            raise CheckpointError(
                f"{source}: block {i} has lora_B of shape {tuple(b.shape)} but with lora_A {tuple(a.shape)} it must be "
                f"(3 * {dim}, {a.shape[0]}) = ({3 * dim}, {a.shape[0]}): qkv has {3 * dim} outputs (q, k, v)."
            )
        ranks.setdefault(int(a.shape[0]), []).append(i)
    if len(ranks) > 1:
        detail = "; ".join(f"rank {r}: blocks {_ranges(bs)}" for r, bs in sorted(ranks.items()))
        raise CheckpointError(f"{source} mixes LoRA ranks across blocks ({detail}); vfmkd expects one rank.")
    file_rank = next(iter(ranks))
    if file_rank != rank:
        raise CheckpointError(
            f"{source} has LoRA rank {file_rank} (lora_A ({file_rank}, {dim})) but teacher.lora_rank={rank}; "
            f"set teacher.lora_rank={file_rank} (and teacher.lora_alpha to the value used in training)."
        )


@TEACHERS.register("lora_sam")
class LoraSamTeacher(SamTeacher):
    """Frozen SAM + merged LoRA on the image encoder's qkv layers. Features, preprocessing and
    ``predict_masks`` are :class:`SamTeacher`'s; see the module docstring for the LoRA file format."""

    family = "lora_sam"

    def __init__(
        self,
        variant: str = "auto",
        checkpoint: Optional[str] = None,
        lora_checkpoint: Optional[str] = None,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        input_size: int = 1024,
        init: str = "pretrained",
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
    ) -> None:
        settings = self.settings_from(variant=variant, checkpoint=checkpoint, lora_checkpoint=lora_checkpoint,
                                      lora_rank=lora_rank, lora_alpha=lora_alpha, input_size=input_size, init=init,
                                      dtype=dtype, device=device, seed=seed)
        variant, checkpoint = settings.variant, settings.checkpoint  # `auto` resolved (base SAM file, else the LoRA)
        # The base file is checked against teacher.variant first (a vit_b base under variant=vit_l is the base's
        # fault, not the LoRA's), then the LoRA file against the base model's shapes, before anything is built.
        if init == "pretrained":
            found, _, read = auto_variant("sam", variant, checkpoint, init, self.detect_variant)
            if read is not None and found != variant:
                raise wrong_variant_error(read, found, variant)
        lora: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
        if lora_checkpoint:
            path = Path(lora_checkpoint)
            if not path.exists():
                raise CheckpointError(
                    f"LoRA checkpoint not found: {path} (absolute: {path.resolve()}); set teacher.lora_checkpoint to "
                    f"the file with the LoRA matrices ({_KEY_FORMAT}; format: vfmkd/teachers/lora_sam_teacher.py)."
                )
            sd = unwrap_state_dict(load_checkpoint(path))
            lora = check_lora_state_dict(sd, variant, lora_rank, source=f"LoRA checkpoint {path}")
            lora_id = sha256_of_file(path)
        elif init == "pretrained":
            raise ConfigError(
                "the lora_sam teacher needs teacher.lora_checkpoint=/path/to/lora.pt (the LoRA A/B matrices, "
                "format: vfmkd/teachers/lora_sam_teacher.py); for the plain base model use the 'sam' teacher."
            )
        else:
            lora_id = _NO_LORA
            logger.warning("lora_sam: no teacher.lora_checkpoint with init=random: the LoRA is empty (B = 0), "
                           "the teacher is the random base SAM.")

        super().__init__(variant=variant, checkpoint=checkpoint, input_size=input_size, init=init,
                         dtype=dtype, device=device, seed=seed)
        self.settings = settings  # the full record, with the LoRA keys
        self.lora_checkpoint = lora_checkpoint
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha)
        self._weights_id = _combined_weights_id(self._weights_id, lora_id)
        if lora is not None:
            self._merge(lora, self.lora_alpha / lora_rank)
            logger.info("Merged LoRA (rank %d, alpha %g) from %s into %d qkv layers.",
                        lora_rank, lora_alpha, lora_checkpoint, len(lora))
        self.freeze()

    @classmethod
    def _auto_variant(cls, values: Mapping[str, Any]) -> Tuple[str, str, Optional[str]]:
        """The base SAM file's size; without one to read (random base), the size the LoRA file was
        trained on (its block count and embed dim), else the default."""
        variant, how, read = auto_variant("sam", cls.default_variant, values.get("checkpoint"), values["init"],
                                          cls.detect_variant)
        lora_file = values.get("lora_checkpoint")
        if read is None and lora_file and Path(lora_file).is_file():
            found = lora_base_variant(unwrap_state_dict(load_checkpoint(lora_file)))
            if found is not None:
                return found, f"the base size of LoRA file {lora_file}", None
        return variant, how, read

    @classmethod
    def _check_settings(cls, settings: TeacherSettings) -> None:
        super()._check_settings(settings)
        _check_lora_hparams(settings.extra["lora_rank"], settings.extra["lora_alpha"])

    @torch.no_grad()
    def _merge(self, lora: List[Tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """``qkv.weight += scaling * B @ A`` for every block (computed in float64)."""
        for blk, (a, b) in zip(self.sam.image_encoder.blocks, lora):
            w = blk.attn.qkv.weight
            delta = (b.double() @ a.double()) * scaling
            w.add_(delta.to(device=w.device, dtype=w.dtype))

    @classmethod
    def _fingerprint(cls, settings: TeacherSettings, weights_id: str) -> TeacherFingerprint:
        """SAM's fingerprint with the LoRA hyper-parameters in the variant; ``weights_id`` covers both files."""
        base = SamTeacher._fingerprint(settings, weights_id)
        rank, alpha = settings.extra["lora_rank"], float(settings.extra["lora_alpha"])
        return dataclasses.replace(base, family="lora_sam", variant=f"{base.variant}+lora_r{rank}_a{alpha:g}")

    @classmethod
    def _config_weights_id(cls, settings: TeacherSettings) -> str:
        base = config_weights_id("sam", settings.variant, settings.checkpoint, settings.init, settings.seed)
        lora_checkpoint = settings.extra["lora_checkpoint"]
        if not lora_checkpoint:
            lora_id = _NO_LORA
        elif Path(lora_checkpoint).is_file():
            lora_id = sha256_of_file(lora_checkpoint)
        else:
            lora_id = f"unknown (LoRA checkpoint {lora_checkpoint} is not on this machine)"
        return _combined_weights_id(base, lora_id)


def _combined_weights_id(base: str, lora_id: str) -> str:
    """``<base id>+<LoRA id>``; ``unknown (...)`` naming what is missing when either file is."""
    unknown = [w for w in (base, lora_id) if w.startswith("unknown")]
    return f"unknown ({'; '.join(unknown)})" if unknown else f"{base}+{lora_id}"


def _check_lora_hparams(rank: object, alpha: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"teacher.lora_rank must be a positive integer (the r of the LoRA file), got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError("teacher.lora_alpha must be a positive number (scaling = lora_alpha / lora_rank), got "
                          f"{alpha!r}.")
