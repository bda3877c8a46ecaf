"""SAM with LoRA adapters on its image encoder's ``qkv`` projections, as a frozen teacher.

For users who fine-tuned SAM with LoRA on their own domain (ultrasound, microscopy, ...): the base
SAM is loaded exactly like the ``sam`` teacher (this class subclasses :class:`SamTeacher`: same
checkpoint checks, preprocessing, features, ``predict_masks``), then the LoRA matrices are MERGED
into the ``qkv`` weights once (``W <- W + (lora_alpha / lora_rank) * B @ A``), so the forward pass,
its cost and SAM's own predictor are unchanged, and the teacher stays frozen.

LoRA files (:mod:`vfmkd.teachers.lora_formats`): vfmkd's own layout (``image_encoder.blocks.{i}.attn.qkv.lora_A``
``(r, C)`` and ``.lora_B`` ``(3C, r)`` for every block, what ``tools/finetune_teacher.py`` writes), a PEFT state
dict, or a SAMed checkpoint; the format is detected from the keys, ``teacher.lora_rank: null`` reads the rank
from the tensors and ``teacher.lora_alpha: null`` the alpha from the file (vfmkd's ``lora_alpha``, PEFT's
``adapter_config.json``, SAMed: r, i.e. no scaling; a file that does not say: 8, PEFT's default, with a warning).
The adapted projection is ``qkv(x) = x W^T + b + (lora_alpha / r) * x A^T B^T`` (the PEFT convention), the
``3C`` rows of ``B`` ordered q, k, v like SAM's fused ``qkv`` Linear. A file's ``prompt_encoder.*`` /
``mask_decoder.*`` tensors (a fine-tuned decoder) replace SAM's, so ``mask_logits`` prompts the fine-tuned
decoder.

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
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["LoraSamTeacher", "lora_key"]

import torch

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.teachers.base import TeacherFingerprint
from vfmkd.teachers.loading import auto_variant, config_weights_id
from vfmkd.teachers.lora_formats import (
    KEY_FORMAT,
    LoraFile,
    check_lora_state_dict,
    load_decoder,
    lora_base_variant,
    lora_key,
    read_lora_file,
)
from vfmkd.teachers.sam_teacher import SamTeacher, wrong_variant_error
from vfmkd.teachers.settings import TeacherSettings
from vfmkd.utils.checkpoint import sha256_of_file

logger = logging.getLogger("vfmkd")

_NO_LORA = "no-lora"
_DEFAULT_RANK = 8  # no LoRA file (init=random) and no teacher.lora_rank
_DEFAULT_ALPHA = 8.0  # a file that does not say its alpha, and no teacher.lora_alpha (PEFT's default lora_alpha)
_READ: Dict[Tuple[str, int, int], LoraFile] = {}


@TEACHERS.register("lora_sam")
class LoraSamTeacher(SamTeacher):
    """Frozen SAM + merged LoRA on the image encoder's qkv layers (and the file's fine-tuned prompt
    encoder / mask decoder, when it holds them). Features, preprocessing, ``mask_logits`` and
    ``predict_masks`` are :class:`SamTeacher`'s; file formats: :mod:`vfmkd.teachers.lora_formats`."""

    family = "lora_sam"

    def __init__(
        self,
        variant: str = "auto",
        checkpoint: Optional[str] = None,
        lora_checkpoint: Optional[str] = None,
        lora_rank: Optional[int] = None,
        lora_alpha: Optional[float] = None,
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
        lora_rank, lora_alpha = settings.extra["lora_rank"], settings.extra["lora_alpha"]  # null: read from the file
        # The base file is checked against teacher.variant first (a vit_b base under variant=vit_l is the base's
        # fault, not the LoRA's), then the LoRA file against the base model's shapes, before anything is built.
        if init == "pretrained":
            found, _, read = auto_variant("sam", variant, checkpoint, init, self.detect_variant)
            if read is not None and found != variant:
                raise wrong_variant_error(read, found, variant)
        lora: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
        file: Optional[LoraFile] = None
        if lora_checkpoint:
            if not Path(lora_checkpoint).exists():
                raise CheckpointError(
                    f"LoRA checkpoint not found: {lora_checkpoint} (absolute: {Path(lora_checkpoint).resolve()}); set "
                    f"teacher.lora_checkpoint to the file with the LoRA matrices ({KEY_FORMAT}, or PEFT/SAMed; "
                    "formats: vfmkd/teachers/lora_formats.py).")
            file = _read(lora_checkpoint)
            source = f"LoRA checkpoint {lora_checkpoint} ({file.format} format)"
            if file.format == "samed" and file.rank != lora_rank:
                raise CheckpointError(f"{source} has LoRA rank {file.rank} (w_a ({file.rank}, C)) but "
                                      f"teacher.lora_rank={lora_rank}; set teacher.lora_rank={file.rank} (or null).")
            lora = check_lora_state_dict(file.lora, variant, lora_rank * file.rank_factor, source=source)
            if file.alpha is not None and file.alpha != float(lora_alpha):
                logger.warning("teacher.lora_alpha=%g overrides the %g %s was trained with.", lora_alpha, file.alpha,
                               lora_checkpoint)
            lora_id = sha256_of_file(lora_checkpoint)
        elif init == "pretrained":
            raise ConfigError(
                "the lora_sam teacher needs teacher.lora_checkpoint=/path/to/lora.pt (the LoRA A/B matrices, "
                "formats: vfmkd/teachers/lora_formats.py); for the plain base model use the 'sam' teacher."
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
        if lora is not None and file is not None:
            self._merge(lora, self.lora_alpha / lora_rank)
            decoder = load_decoder(self.sam, file.decoder, f"LoRA checkpoint {lora_checkpoint}")
            logger.info("Merged LoRA (rank %d, alpha %g) from %s (%s format) into %d qkv layers%s.", lora_rank,
                        self.lora_alpha, lora_checkpoint, file.format, len(lora),
                        f"; loaded its fine-tuned {' and '.join(decoder)}" if decoder else "")
        self.freeze()

    @classmethod
    def settings_from(cls, **kwargs: Any) -> TeacherSettings:
        """SAM's settings with ``lora_rank: null`` read from the LoRA file's tensors and ``lora_alpha: null``
        from the file (vfmkd's ``lora_alpha``, PEFT's adapter_config.json, SAMed: r), else 8 (PEFT's default)."""
        settings = super().settings_from(**kwargs)
        extra = dict(settings.extra)
        path = extra.get("lora_checkpoint")
        unknown = extra["lora_rank"] is None or extra["lora_alpha"] is None  # else the file is not read here
        file = _read(path) if unknown and path and Path(path).is_file() else None
        if extra["lora_rank"] is None:
            extra["lora_rank"] = file.rank if file is not None and file.rank else _DEFAULT_RANK
        if extra["lora_alpha"] is None:
            if file is not None and file.alpha is None:
                logger.warning("LoRA checkpoint %s (%s format) does not say its lora_alpha: assuming %g (PEFT's "
                               "default); set teacher.lora_alpha to the value used in training.", path, file.format,
                               _DEFAULT_ALPHA)
            known = file.alpha if file is not None else None
            extra["lora_alpha"] = _DEFAULT_ALPHA if known is None else known
        settings = dataclasses.replace(settings, extra=extra)
        _check_lora_hparams(extra["lora_rank"], extra["lora_alpha"])
        return settings

    @classmethod
    def _auto_variant(cls, values: Mapping[str, Any]) -> Tuple[str, str, Optional[str]]:
        """The base SAM file's size; without one to read (random base), the size the LoRA file was
        trained on (its block count and embed dim), else the default."""
        variant, how, read = auto_variant("sam", cls.default_variant, values.get("checkpoint"), values["init"],
                                          cls.detect_variant)
        lora_file = values.get("lora_checkpoint")
        if read is None and lora_file and Path(lora_file).is_file():
            found = lora_base_variant(_read(lora_file).lora)
            if found is not None:
                return found, f"the base size of LoRA file {lora_file}", None
        return variant, how, read

    @classmethod
    def _check_settings(cls, settings: TeacherSettings) -> None:
        super()._check_settings(settings)
        rank, alpha = settings.extra["lora_rank"], settings.extra["lora_alpha"]
        _check_lora_hparams(_DEFAULT_RANK if rank is None else rank, 1.0 if alpha is None else alpha)

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


def _read(path: str | Path) -> LoraFile:
    """:func:`read_lora_file`, remembered per file version (the settings and the build both read it)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READ:
        _READ.clear()  # one file at a time: a SAMed file holds a whole decoder
        _READ[key] = read_lora_file(path)
    return _READ[key]


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
