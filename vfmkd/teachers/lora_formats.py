"""LoRA files for SAM's image-encoder ``qkv`` layers, in the layouts the common tools write, read into
one record (:class:`LoraFile`) that the ``lora_sam`` teacher merges.

Formats, told apart by their keys:

* ``vfmkd``: ``image_encoder.blocks.{i}.attn.qkv.lora_A`` ``(r, C)`` and ``.lora_B`` ``(3C, r)`` for every
  block, plain or wrapped (``{"model": sd}`` / ``{"state_dict": sd}``); ``tools/finetune_teacher.py`` writes
  ``{"format": "vfmkd_lora_sam", "lora_rank": r, "lora_alpha": a, "variant": v, "state_dict": sd}``.
* ``peft`` (``get_peft_model_state_dict``):
  ``[base_model.model.]image_encoder.blocks.{i}.attn.qkv.lora_A[.default].weight`` ``(r, C)`` and
  ``lora_B...weight`` ``(3C, r)``; alpha from ``adapter_config.json`` beside the file (its ``lora_alpha``),
  else ``teacher.lora_alpha``.
* ``samed`` (SAMed's ``save_lora_parameters``): ``w_a_{k:03d}`` ``(r, C)`` and ``w_b_{k:03d}`` ``(C, r)``, two
  per block (``k = 2i``: q of block ``i``, ``2i + 1``: v), applied without scaling (alpha = r). Fused here
  into one qkv adapter of ``2r`` rows: ``A = [A_q; A_v]``, ``B = [[B_q, 0], [0, 0], [0, B_v]]``.

Any format may also hold ``mask_decoder.*`` / ``prompt_encoder.*`` tensors (a fine-tuned decoder; SAMed
always saves both): the teacher loads them into SAM's own modules. A key that is none of these is
named in a :class:`CheckpointError`. The adapted projection is ``qkv(x) = x W^T + b + (alpha / r) x A^T B^T``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from vfmkd.core.errors import CheckpointError
from vfmkd.core.sam_variants import SAM_VARIANTS
from vfmkd.utils.checkpoint import load_checkpoint, unwrap_state_dict

#: the ``format`` tag of the file tools/finetune_teacher.py writes
VFMKD_FORMAT = "vfmkd_lora_sam"
DECODER_PREFIXES = ("mask_decoder.", "prompt_encoder.")
_PEFT_PREFIX = "base_model.model."
_PEFT_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.lora_([AB])(?:\.default)?\.weight$")
_SAMED_RE = re.compile(r"^w_([ab])_(\d+)$")
PEFT_CONFIG = "adapter_config.json"


@dataclass
class LoraFile:
    """A LoRA file in vfmkd's layout, whatever layout it was written in.

    ``format``: vfmkd | peft | samed. ``lora``: ``{key: tensor}`` with vfmkd's keys (:func:`lora_key`):
    per block ``lora_A`` ``(R, C)`` and ``lora_B`` ``(3C, R)``, ``R = rank * rank_factor`` (SAMed's q and v
    adapters fused: factor 2). ``rank``: the file's own r; ``alpha``: the scaling numerator it was trained
    with when the file says (None: ask the config). ``decoder``: ``mask_decoder.*`` / ``prompt_encoder.*``
    tensors (keys of SAM's state_dict), empty when the decoder is the base's."""

    format: str
    lora: Dict[str, torch.Tensor]
    rank: Optional[int]
    alpha: Optional[float]
    rank_factor: int = 1
    decoder: Dict[str, torch.Tensor] = field(default_factory=dict)


def read_lora_file(path: Path | str) -> LoraFile:
    """Load (``weights_only``) and convert a LoRA file of any supported format (module docstring)."""
    path = Path(path)
    raw = load_checkpoint(path)
    meta: Mapping[str, Any] = raw if isinstance(raw, Mapping) and raw.get("format") == VFMKD_FORMAT else {}
    sd = unwrap_state_dict(raw)
    decoder = {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}
    rest = {k: v for k, v in sd.items() if k not in decoder}
    if any(_SAMED_RE.match(k) for k in rest):
        lora, rank = _from_samed(rest, f"LoRA checkpoint {path} (SAMed format)")
        return LoraFile("samed", lora, rank, float(rank), 2, decoder)
    if any(k.startswith(_PEFT_PREFIX) or _PEFT_RE.match(k) for k in sd):
        stripped = {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v for k, v in sd.items()}
        decoder = {k: v for k, v in stripped.items() if k.startswith(DECODER_PREFIXES)}
        lora = {}
        for key, value in stripped.items():
            m = _PEFT_RE.match(key)
            if m:
                lora[lora_key(int(m.group(1)), m.group(2))] = value
            elif key not in decoder:
                lora[key] = value  # named by check_lora_state_dict as a key that is not a qkv LoRA matrix
        return LoraFile("peft", lora, _rank_of(lora), _peft_alpha(path), 1, decoder)
    alpha = meta.get("lora_alpha")
    return LoraFile("vfmkd", rest, _rank_of(rest), None if alpha is None else float(alpha), 1, decoder)


def _rank_of(lora: Mapping[str, torch.Tensor]) -> Optional[int]:
    a = lora.get(lora_key(0, "A"))
    return int(a.shape[0]) if isinstance(a, torch.Tensor) and a.ndim == 2 else None


def _peft_alpha(path: Path) -> Optional[float]:
    """``lora_alpha`` of the ``adapter_config.json`` PEFT saves beside its weights, if there is one."""
    config = path.parent / PEFT_CONFIG
    if not config.is_file():
        return None
    try:
        alpha = json.loads(config.read_text()).get("lora_alpha")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config} (beside LoRA checkpoint {path}) is not readable JSON: {err}") from None
    return None if alpha is None else float(alpha)


def _from_samed(sd: Mapping[str, torch.Tensor], source: str) -> Tuple[Dict[str, torch.Tensor], int]:
    """SAMed's per-block q and v adapters -> vfmkd's fused qkv adapter of rank 2r; returns it and r."""
    parts: Dict[str, Dict[int, torch.Tensor]] = {"a": {}, "b": {}}
    foreign = []
    for key, value in sd.items():
        m = _SAMED_RE.match(key)
        if m:
            parts[m.group(1)][int(m.group(2))] = value
        else:
            foreign.append(key)
    if foreign:
        raise CheckpointError(f"{source} has {len(foreign)} key(s) that are neither LoRA matrices (w_a_NNN, w_b_NNN) "
                              f"nor prompt_encoder.*/mask_decoder.* tensors: {', '.join(foreign[:3])}.")
    count = len(parts["a"])
    if sorted(parts["a"]) != list(range(count)) or sorted(parts["b"]) != list(range(count)) or count % 2:
        raise CheckpointError(
            f"{source}: expected w_a_000..w_a_{{2n-1}} and w_b_000..w_b_{{2n-1}} (q and v of every image-encoder "
            f"block), got {len(parts['a'])} w_a and {len(parts['b'])} w_b tensors; SAMed trained on some blocks only "
            "(lora_layer) cannot be placed.")
    ranks = {int(t.shape[0]) for t in parts["a"].values() if t.ndim == 2}
    if len(ranks) != 1 or any(t.ndim != 2 for t in (*parts["a"].values(), *parts["b"].values())):
        raise CheckpointError(f"{source}: the w_a/w_b matrices must be 2-D of one rank, got ranks {sorted(ranks)}.")
    rank = ranks.pop()
    lora: Dict[str, torch.Tensor] = {}
    for block in range(count // 2):
        a_q, a_v = parts["a"][2 * block].float(), parts["a"][2 * block + 1].float()
        b_q, b_v = parts["b"][2 * block].float(), parts["b"][2 * block + 1].float()
        dim = int(a_q.shape[1])
        if {tuple(b_q.shape), tuple(b_v.shape)} != {(dim, rank)} or tuple(a_v.shape) != (rank, dim):
            raise CheckpointError(
                f"{source}: block {block}: w_a ({tuple(a_q.shape)}, {tuple(a_v.shape)}) and w_b ({tuple(b_q.shape)}, "
                f"{tuple(b_v.shape)}) do not form rank-{rank} adapters of a {dim}-wide qkv (w_a (r, C), w_b (C, r)).")
        fused_b = torch.zeros(3 * dim, 2 * rank)
        fused_b[:dim, :rank] = b_q
        fused_b[2 * dim:, rank:] = b_v
        lora[lora_key(block, "A")] = torch.cat([a_q, a_v])
        lora[lora_key(block, "B")] = fused_b
    return lora, rank


def load_decoder(sam: Any, decoder: Mapping[str, torch.Tensor], source: str) -> List[str]:
    """Load a file's ``prompt_encoder.*`` / ``mask_decoder.*`` tensors into ``sam`` (each module whole,
    strict); returns the modules loaded. A tensor that does not fit is a :class:`CheckpointError`."""
    loaded = []
    for prefix in DECODER_PREFIXES:
        part = {k[len(prefix):]: v for k, v in decoder.items() if k.startswith(prefix)}
        if not part:
            continue
        name = prefix[:-1]
        try:
            getattr(sam, name).load_state_dict(part, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{source}: its {name} tensors do not fit SAM's {name} (e.g. a SAMed decoder trained with another "
                f"num_classes): {' '.join(str(err).split())[:400]}") from None
        loaded.append(name)
    return loaded


_LORA_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.qkv\.lora_([AB])$")
KEY_FORMAT = "image_encoder.blocks.{i}.attn.qkv.lora_A (r, C) and .lora_B (3C, r)"
_SAM_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


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
                f"the 'sam' teacher); teacher.lora_checkpoint takes only the LoRA matrices, {KEY_FORMAT}."
            )
        raise CheckpointError(
            f"{source} holds no LoRA matrices for SAM's qkv layers in any known format (first keys: "
            f"{', '.join(list(state_dict)[:5])}); expected vfmkd's {KEY_FORMAT}, PEFT's "
            "base_model.model.image_encoder.blocks.{i}.attn.qkv.lora_A.weight/lora_B.weight or SAMed's w_a_NNN/w_b_NNN "
            "for every image-encoder block (formats: vfmkd/teachers/lora_formats.py)."
        )
    if foreign:
        raise CheckpointError(
            f"{source} has {len(foreign)} key(s) that are not qkv LoRA matrices (e.g. {', '.join(foreign[:3])}); "
            f"a LoRA file holds only {KEY_FORMAT}, plus optional mask_decoder.*/prompt_encoder.* tensors; vfmkd merges "
            "LoRA on attn.qkv only (formats: vfmkd/teachers/lora_formats.py)."
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


