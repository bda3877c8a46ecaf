"""DSRL resolution distillation (Wang et al., "Dual Super-Resolution Learning for Semantic
Segmentation", CVPR 2020) for a segmentation student.

The student sees the canvas (S x S, ``data.img_size``) downscaled to s = S / ``sr_target_scale``
(:meth:`UnifiedModel.prepare_input`, so evaluation and export do the same); its segmentation head is
what runs at inference and its logits are upsampled to the label size by the losses and scorers.
During training only, a super-resolution branch (:class:`SRBranch`, owned by the distiller like the
feature adapters, so the evaluated and exported model holds no SR parameter) decodes the student's
finest neck level back to the S x S canvas:

* ``loss_sr``  = MSE(SR image, canvas image);
* ``loss_fa``  = the existing ``feature_affinity`` loss (:class:`FeatureAffinityLoss`, reused: its
  adapter and its pooled affinity comparison) between the segmentation features (the neck level
  the segmentation head reads first) and the SR branch's features, both on the SR branch's grid,
  pooled by ``fa_subscale``;
* ``loss_resolution_distill`` = ``sr_loss_weight`` x loss_sr + ``fa_loss_weight`` x loss_fa, a
  task-kind term (scaled by ``distillation.alpha``) named ``resolution_distill`` in stages.

``use_low_res_sr: false`` (DSRL): the branch's features are upsampled to S and decoded there, FA
compares at S pooled by ``fa_subscale``. ``true`` (memory lever): the branch works on the level's
grid, pixel-shuffles a 3-channel image to s and only that is resized to S; FA compares at s.

``mode: dual`` (seed 001's two paths): the student is built at full resolution and each training step
runs it twice with shared weights (:class:`DualResolutionStudent`): the high path on the canvas S and
the low path on s (its segmentation heads only; ``StudentOutput.low``). The SR branch reconstructs
the canvas from the low path's level; FA aligns the low path's level (adapted) to the high path's
(a fixed target with ``fa_detach_high: true``, else FA moves both paths); the task losses run on both
paths (:class:`DualPathTaskLoss`: ``task_weight_high`` x high + ``task_weight_low`` x low, logged as
``<loss>_high`` / ``<loss>_low``). Inference uses the high path (``model.infer_scale`` picks the low
one). While the ``resolution_distill`` term is outside the active stage the step is single-pass.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import TASKS
from vfmkd.distillation.losses.affinity import FeatureAffinityLoss
from vfmkd.distillation.terms import LossTerm
from vfmkd.models.input_scale import check_input_geometry, downscale_input, resolution_distill_settings
from vfmkd.tasks import get_task, tasks_of

TERM_NAME = "resolution_distill"
LOG_NAME = "loss_resolution_distill"


class SRBranch(nn.Module):
    """The training-only super-resolution decoder: level (B, C, g, g) -> (SR image (B, 3, S, S),
    SR features for FA). ``stride``: the level's stride in the student's input."""

    def __init__(self, in_channels: int, stride: int, feat_channels: int = 64, low_res: bool = False) -> None:
        super().__init__()
        self.stride, self.low_res = int(stride), bool(low_res)
        self.stem = Conv(in_channels, feat_channels, 3)
        if self.low_res:  # work on the level's grid, emit the image by pixel shuffle
            self.to_image = nn.Sequential(nn.Conv2d(feat_channels, 3 * self.stride ** 2, 1),
                                          nn.PixelShuffle(self.stride))
        else:  # DSRL: decode at the SR target resolution
            self.refine = Conv(feat_channels, feat_channels, 3)
            self.to_image = nn.Conv2d(feat_channels, 3, 1)

    def forward(self, level: torch.Tensor, target_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = self.stem(level)
        if self.low_res:
            image = F.interpolate(self.to_image(feats), size=target_hw, mode="bilinear", align_corners=False)
            return image, feats
        feats = self.refine(F.interpolate(feats, size=target_hw, mode="bilinear", align_corners=False))
        return self.to_image(feats), feats


class ResolutionDistillLoss(nn.Module):
    """The DSRL term: ``forward(out: StudentOutput, batch)`` -> (sr_w x loss_sr + fa_w x loss_fa,
    {loss_sr, loss_fa}). It reads the whole student output (``reads_student_output``): the
    segmentation level ``level`` of ``out.neck`` (single) or of ``out.low.neck`` with ``out.neck`` as
    FA's target (``dual``); the SR target is ``batch.images`` (the canvas). ``low_heads``: the heads the
    dual low path runs (the segmentation heads)."""

    kind = "task"
    reads_student_output = True

    def __init__(self, level: str, level_channels: int, level_stride: int, scale: float, feat_channels: int = 64,
                 sr_loss_weight: float = 0.1, fa_loss_weight: float = 1.0, fa_subscale: float = 0.125,
                 use_low_res_sr: bool = False, fa_detach_sr: bool = False, dual: bool = False,
                 fa_detach_high: bool = True, low_heads: Sequence[str] = ()) -> None:
        super().__init__()
        self.level, self.scale, self.dual = level, float(scale), bool(dual)
        self.sr_loss_weight, self.fa_loss_weight = float(sr_loss_weight), float(fa_loss_weight)
        self.fa_detach_sr, self.fa_detach_high, self.low_heads = fa_detach_sr, bool(fa_detach_high), tuple(low_heads)
        self.branch = SRBranch(level_channels, level_stride, feat_channels, use_low_res_sr)
        # single: the level vs the SR branch's features; dual: the low path's level vs the high path's
        target = ("high", level_channels) if self.dual else ("sr", feat_channels)
        self.fa = FeatureAffinityLoss(target[0], level_channels, target[1], student_level=level,
                                      fa_subscale=fa_subscale)

    def fa_grid(self, canvas_hw: Tuple[int, int]) -> Tuple[int, int]:
        """Where FA compares before its pooling: S (DSRL) or, with use_low_res_sr, the student's input s."""
        if not self.branch.low_res:
            return tuple(canvas_hw)  # type: ignore[return-value]
        return (round(canvas_hw[0] / self.scale), round(canvas_hw[1] / self.scale))

    def forward(self, out: Any, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.dual and out.low is None:
            raise ValueError("resolution_distill (mode: dual) needs the low path's output (StudentOutput.low): run "
                             "the student through DualResolutionStudent (the training step does)")
        level = (out.low if self.dual else out).neck[self.level].float()
        images = batch.images.to(level.device).float()
        canvas = tuple(images.shape[-2:])
        sr_image, sr_feats = self.branch(level, canvas)
        loss_sr = F.mse_loss(sr_image, images)
        del sr_image
        grid = self.fa_grid(canvas)
        # The adapter is a 1x1 conv: applied before the bilinear resize it gives the same map as
        # FeatureAffinityLoss.forward on the resized level, at (g/grid)^2 of the adapter's memory.
        adapted = _resize(self.fa.adapter(level), grid)
        if self.dual:
            high = out.neck[self.level].float()
            target = high.detach() if self.fa_detach_high else high
        else:
            target = sr_feats.detach() if self.fa_detach_sr else sr_feats
        teacher = _resize(target, grid)
        del sr_feats, target
        mask = torch.ones_like(adapted[:, :1])
        loss_fa = self.fa.compare(adapted, teacher, mask)
        total = self.sr_loss_weight * loss_sr + self.fa_loss_weight * loss_fa
        return total, {"loss_sr": loss_sr.detach(), "loss_fa": loss_fa.detach()}


class DualResolutionStudent(nn.Module):
    """The student as a dual-path training step runs it: ``forward(images (B, 3, S, S))`` -> the model's
    :class:`StudentOutput` on the canvas (high path) with ``low`` = its output on the canvas downscaled
    by ``scale`` (s = S / scale; heads ``low_heads`` only), shared weights. ``active()`` False (the
    resolution term is outside the current stage): the high path alone."""

    def __init__(self, model: nn.Module, scale: float, low_heads: Sequence[str], active: Callable[[], bool]) -> None:
        super().__init__()
        self.model, self.scale, self.low_heads, self.active = model, float(scale), tuple(low_heads), active

    def forward(self, images: torch.Tensor) -> Any:
        out = self.model(images)
        if self.active():
            out.low = self.model(downscale_input(images, self.scale), heads=self.low_heads)
        return out


class DualPathTaskLoss(nn.Module):
    """A task loss on both paths of a dual step: ``forward(out: StudentOutput, batch)`` ->
    (``weight_high`` x loss(high head output) + ``weight_low`` x loss(low head output), items). Items:
    the high path's parts as the distiller names them (``<log_name>_<part>``) and ``<log_name>_high`` /
    ``<log_name>_low``. Without a low output this step (a stage without resolution_distill) it is the
    plain loss; a head the low path does not run gets ``weight_high`` x its loss."""

    kind = "task"
    reads_student_output = True

    def __init__(self, loss: nn.Module, head: str, log_name: str, weight_high: float, weight_low: float) -> None:
        super().__init__()
        self.loss, self.head, self.log_name = loss, head, log_name
        self.weight_high, self.weight_low = float(weight_high), float(weight_low)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """The wrapped loss's per-epoch schedule, if it has one (:meth:`Distiller.on_epoch_start`)."""
        hook = getattr(self.loss, "on_epoch_start", None)
        if hook is not None:
            hook(epoch, epochs)

    def forward(self, out: Any, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        value, items = self.loss(out.heads[self.head], batch)
        logs = {f"{self.log_name}_{k}": v for k, v in items.items()}
        if out.low is None:  # a single-pass step
            return value, logs
        if self.head not in out.low.heads:  # a head the low path does not run (boxes: canvas strides)
            return self.weight_high * value, logs
        low, _ = self.loss(out.low.heads[self.head], batch)
        logs.update({f"{self.log_name}_high": value.detach(), f"{self.log_name}_low": low.detach()})
        return self.weight_high * value + self.weight_low * low, logs


def dual_resolution_student(model: nn.Module, distiller: Any) -> nn.Module:
    """What a training step runs: a :class:`DualResolutionStudent` when ``distiller`` holds a dual-mode
    resolution term (active while that term is in the stage), else ``model`` itself."""
    term = dict(getattr(distiller, "task_modules", {})).get(TERM_NAME)
    if not isinstance(term, ResolutionDistillLoss) or not term.dual:
        return model
    return DualResolutionStudent(model, term.scale, term.low_heads, lambda: TERM_NAME in distiller.active)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return (
        x
        if tuple(x.shape[-2:]) == tuple(size)
        else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    )


def segmentation_head(model: Any, rd: Mapping[str, Any], where: str = "model.resolution_distill") -> str:
    """The head DSRL trains (``head:``, else the only semantic/binary head); refuses a student without
    one and, in single mode, heads that answer in input pixels (their outputs would be in the
    low-resolution frame; dual trains and infers them on the full-resolution path)."""
    tasks = tasks_of(model.heads)
    # dense logits are upsampled to the label size (right at any input size); canvas-stride heads are
    # built in canvas pixels; anything else (prompts) would be off by sr_target_scale
    pixel = sorted(n for n, t in tasks.items() if not (t.dense_logits or t.canvas_stride))
    if pixel and rd.get("mode", "single") == "single":
        supported = sorted(n for n in TASKS.names() if get_task(n).dense_logits or get_task(n).canvas_stride)
        raise ConfigError(
            f"{where}: DSRL downsizes the student's input, but head(s) {pixel} "
            f"({', '.join(tasks[n].name for n in pixel)}) "
            f"answer in input pixels (boxes, prototypes, prompts) and would be off by sr_target_scale; DSRL supports "
            f"{', '.join(supported)} heads only (remove those heads or disable resolution_distill)")
    seg = [n for n, t in tasks.items() if t.dense_logits]
    head = rd.get("head") or (seg[0] if len(seg) == 1 else None)
    if not seg:
        named = {n: t.name for n, t in tasks.items()}
        raise ConfigError(f"{where}: DSRL needs a segmentation head (semantic_head or binary_head): it trains the "
                          f"low-resolution segmentation path; heads: {named or 'none'}")
    if head is None or head not in seg:
        raise ConfigError(f"{where}: set head: to one of the segmentation heads {seg}")
    return head


def build_resolution_term(model: Any, model_cfg: Any,
                          img_size: int) -> Optional[Tuple[str, ResolutionDistillLoss, str]]:
    """(term name, loss module, head) for ``model.resolution_distill`` (None when disabled); the
    geometry and head checks run here, before training starts."""
    rd = resolution_distill_settings(model_cfg)
    if not rd.get("enabled"):
        return None
    head = segmentation_head(model, rd)
    scale = float(rd["sr_target_scale"])
    specs = list(model.neck.feature_specs())
    max_stride = max([s.stride for s in specs] + [s.stride for s in model.backbone.feature_specs()])
    check_input_geometry(int(img_size), scale, max_stride)
    read: List[str] = list(getattr(model.heads[head], "level_names", None) or [specs[0].name])
    spec = {s.name: s for s in specs}[read[0]]
    dual = rd.get("mode", "single") == "dual"
    low_heads = sorted(n for n, t in tasks_of(model.heads).items() if t.dense_logits) if dual else []
    module = ResolutionDistillLoss(spec.name, spec.channels, spec.stride, scale, int(rd["feat_channels"]),
                                   float(rd["sr_loss_weight"]), float(rd["fa_loss_weight"]), float(rd["fa_subscale"]),
                                   bool(rd["use_low_res_sr"]), bool(rd.get("fa_detach_sr", False)), dual,
                                   bool(rd.get("fa_detach_high", True)), low_heads)
    return TERM_NAME, module, head


def with_resolution_terms(terms: Sequence[LossTerm], model: Any, model_cfg: Any, img_size: int) -> List[LossTerm]:
    """``terms`` plus the ``resolution_distill`` task term of ``model.resolution_distill`` (unchanged when
    disabled). In dual mode every task term of a head is weighted per path (:class:`DualPathTaskLoss`;
    terms that read the whole student output keep their own rule)."""
    built = build_resolution_term(model, model_cfg, img_size)
    if built is None:
        return list(terms)
    name, module, head = built
    rd = resolution_distill_settings(model_cfg)
    weights = float(rd.get("task_weight_high", 1.0)), float(rd.get("task_weight_low", 1.0))
    out: List[LossTerm] = []
    for t in terms:
        if module.dual and t.kind == "task" and not getattr(t.module, "reads_student_output", False) \
                and (t.head in module.low_heads or weights[0] != 1.0):
            t = replace(t, module=DualPathTaskLoss(t.module, t.head, t.log_name, *weights))
        out.append(t)
    return out + [LossTerm(name, "task", 1.0, LOG_NAME, module, head)]
