"""ONNX or TorchScript export of a promptable student (a ``sam_decoder`` head): two graphs, as SAM
itself ships (``<suffix>`` is ``.onnx`` or ``.torchscript``).

* **encoder** ``<stem>.encoder<suffix>``: ``images`` (B, 3, S, S) float in [0, 1] (the letterboxed
  canvas, as the dataset builds it) -> ``image_embeddings`` (B, 256, S/16, S/16): backbone, neck
  and the head's adapter.
* **decoder** ``<stem>.decoder<suffix>``: ``image_embeddings`` (1, 256, h, w) of one image,
  ``point_coords`` (N, P, 2) float canvas pixels x, y and ``point_labels`` (N, P) float -> ``low_res_masks``
  (N, 1, 4h, 4w) logits on the canvas at stride 4 and ``iou_predictions`` (N, 1). N (prompt sets)
  and P (points per set) are free. Labels follow SAM's own ONNX model: 1 foreground point,
  0 background point, 2 / 3 a box's top-left / bottom-right corner, -1 padding. A box is the two
  corner points (labels 2, 3); a prompt set of points only ends with one padding point (0, 0) / -1
  (what SAM's prompt encoder adds when no box is given). :func:`box_prompt` / :func:`point_prompt`
  build these. The graph reproduces ``SamDecoderHead.decode(..., multimask_output=False)``; mask
  input (refinement) is not part of it.

Each file is checked before it is renamed into place: ``onnx.checker`` and ONNX Runtime (or the
saved TorchScript module, loaded back) against PyTorch on a probe (a random image; box and point
prompts of other counts than the traced ones), else :class:`~vfmkd.engine.export.exporter.ExportMismatchError`
and no file. A TorchScript graph takes tensors in the inputs' order above and returns a tuple in the
outputs' order (the names are in the file as ``input_names.json`` / ``output_names.json``).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from vfmkd.engine.export.exporter import ONNX_OPSET, ExportMismatchError, atomic_path, onnx_session
from vfmkd.engine.export.outputs import SUFFIXES
from vfmkd.engine.export.student_graph import example_input
from vfmkd.models.input_scale import check_model_input
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import PromptableOutput, task_of

#: ONNX Runtime vs PyTorch: embeddings, mask logits (scaled by their largest magnitude, at least 1)
#: and IoU predictions.
PROMPT_TOLERANCE = 1e-3
ENCODER_INPUTS, ENCODER_OUTPUTS = ["images"], ["image_embeddings"]
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels"]
DECODER_OUTPUTS = ["low_res_masks", "iou_predictions"]


def promptable_head(model: UnifiedModel) -> Optional[str]:
    """The name of the model's first promptable (``sam_decoder``) head, or None."""
    return next((n for n, h in model.heads.items() if issubclass(task_of(h).output_type, PromptableOutput)), None)


def output_paths(output: Path, fmt: str = "onnx") -> Tuple[Path, Path]:
    """``best.onnx`` -> (``best.encoder.onnx``, ``best.decoder.onnx``); ``best.torchscript`` ->
    (``best.encoder.torchscript``, ``best.decoder.torchscript``)."""
    suffix = SUFFIXES[fmt]
    stem = output.with_suffix("") if output.suffix == suffix else output
    return stem.with_name(stem.name + ".encoder" + suffix), stem.with_name(stem.name + ".decoder" + suffix)


Runner = Callable[..., List[np.ndarray]]


def write_graph(fmt: str, module: nn.Module, args: Tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
                output_names: Sequence[str], axes: Optional[Dict], opset: int) -> Runner:
    """``module`` traced on ``args`` into ``path`` as ONNX (``axes``: its dynamic axes) or TorchScript
    (traced sizes stay free); returns a runner of the written file (numpy inputs in ``input_names``
    order -> numpy outputs), for the check against PyTorch."""
    if fmt == "onnx":
        import onnx

        torch.onnx.export(module, args, str(path), opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(onnx.load(str(path)))
        session = onnx_session(path)
        return lambda *xs: session.run(None, dict(zip(input_names, xs)))
    traced = torch.jit.trace(module, args, strict=False, check_trace=False)
    with open(path, "wb") as f:
        torch.jit.save(traced, f, _extra_files={"input_names.json": json.dumps(list(input_names)),
                                                "output_names.json": json.dumps(list(output_names))})
    loaded = torch.jit.load(str(path))

    def run(*xs: np.ndarray) -> List[np.ndarray]:
        out = loaded(*[torch.from_numpy(x) for x in xs])
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
    return run


class PromptEncoderGraph(nn.Module):
    """images -> the promptable head's image embeddings (nothing of the other heads or the distiller)."""

    def __init__(self, model: UnifiedModel, head: str) -> None:
        super().__init__()
        self.model, self.head = copy.deepcopy(model), head
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()  # the wrapper too: torch.onnx.export restores the top module's mode, recursively

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.heads[self.head](self.model.neck(self.model.backbone(self.model.prepare_input(images))))


class PromptDecoderGraph(nn.Module):
    """SAM's prompt encoder (points/boxes as labelled points, as ``segment_anything.utils.onnx``
    embeds them, without data-dependent branches) and mask decoder for one image's embeddings."""

    def __init__(self, head: nn.Module, grid_hw: Tuple[int, int]) -> None:
        super().__init__()
        head = copy.deepcopy(head).eval()
        head._fit_prompt_encoder(grid_hw)
        self.prompt_encoder, self.mask_decoder = head.prompt_encoder, head.mask_decoder
        self.canvas = (16 * grid_hw[0], 16 * grid_hw[1])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = coords + 0.5  # to pixel centres, as PromptEncoder._embed_points/_embed_boxes
        coords = torch.stack([coords[..., 0] / self.canvas[1], coords[..., 1] / self.canvas[0]], dim=-1)
        emb = pe.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i)
        return emb

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        n, (h, w) = sparse.shape[0], image_embeddings.shape[-2:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        masks, iou = self.mask_decoder.predict_masks(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                                                     dense)
        return masks[:, 0:1], iou[:, 0:1]


def box_prompt(boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) xyxy canvas boxes -> the decoder graph's (N, 2, 2) coords and (N, 2) labels 2, 3."""
    coords = boxes.float().reshape(-1, 2, 2)
    return coords, torch.tensor([2.0, 3.0]).expand(len(boxes), 2).clone()


def point_prompt(points: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, P, 2) canvas points (labels (N, P): 1 fg / 0 bg, default 1) -> coords and labels with the
    padding point SAM's prompt encoder appends to a prompt without a box."""
    n = points.shape[0]
    lab = torch.ones(points.shape[:2]) if labels is None else labels.float()
    coords = torch.cat([points.float(), torch.zeros(n, 1, 2)], dim=1)
    return coords, torch.cat([lab, -torch.ones(n, 1)], dim=1)


def _scaled_diff(got: np.ndarray, want: torch.Tensor) -> float:
    w = want.numpy()
    return float(np.abs(got - w).max() / max(1.0, float(np.abs(w).max()))) if w.size else 0.0


def probe_prompts(imgsz: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]]:
    """Probe prompts: graph inputs and the matching ``decode`` keyword arguments."""
    s = float(imgsz)
    boxes = torch.tensor([[0.1 * s, 0.2 * s, 0.6 * s, 0.7 * s], [0.5 * s, 0.05 * s, 0.95 * s, 0.4 * s]])
    points = torch.tensor([[[0.3 * s, 0.4 * s], [0.7 * s, 0.2 * s]]])
    plabels = torch.tensor([[1, 0]])
    out = {"boxes": (*box_prompt(boxes), {"boxes": boxes}),
           "points": (*point_prompt(points, plabels), {"points": points, "point_labels": plabels})}
    return out


def export_promptable(model: UnifiedModel, output: Path, imgsz: int, fmt: str = "onnx", dynamic: bool = False,
                      opset: int = ONNX_OPSET, tolerance: Optional[float] = PROMPT_TOLERANCE
                      ) -> Dict[str, Dict[str, float]]:
    """Write the encoder and decoder graphs (``fmt`` onnx or torchscript) beside ``output``
    (:func:`output_paths`); each checked against PyTorch. Returns ``{"encoder": {...}, "decoder":
    {...}, "paths": {...}}`` diffs."""
    head = promptable_head(model)
    if head is None:
        raise ValueError("export_promptable: the model has no promptable (sam_decoder) head")
    check_model_input(model, imgsz, "export", "--imgsz")  # the student's strides (a multiple of SAM's 16)
    enc_path, dec_path = output_paths(Path(output), fmt)
    encoder = PromptEncoderGraph(model, head)
    image = example_input(imgsz)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_embeddings": {0: "batch", 2: "h", 3: "w"}} \
        if dynamic else None
    diffs: Dict[str, Dict[str, float]] = {}
    with atomic_path(enc_path) as tmp, torch.no_grad():
        run = write_graph(fmt, encoder, (image,), tmp, ENCODER_INPUTS, ENCODER_OUTPUTS, axes, opset)
        probe = example_input(imgsz, seed=1)
        diffs["encoder"] = {"embeddings": _scaled_diff(run(probe.numpy())[0], encoder(probe))}
        if tolerance is not None and diffs["encoder"]["embeddings"] > tolerance:
            raise ExportMismatchError(f"the encoder graph differs from PyTorch by {diffs['encoder']} (> "
                                      f"{tolerance:.0e}); nothing written to {enc_path}")
    with torch.no_grad():
        embeddings = encoder(example_input(imgsz, seed=1))[:1]
    grid = (int(embeddings.shape[-2]), int(embeddings.shape[-1]))
    decoder = PromptDecoderGraph(model.heads[head], grid)
    coords, labels, _ = probe_prompts(imgsz)["boxes"]
    dec_axes = {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
                "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}
    with atomic_path(dec_path) as tmp, torch.no_grad():
        run = write_graph(fmt, decoder, (embeddings, coords, labels), tmp, DECODER_INPUTS, DECODER_OUTPUTS, dec_axes,
                          opset)
        diff = {"masks": 0.0, "iou": 0.0}
        module = model.heads[head].eval()
        for coords, labels, kwargs in probe_prompts(imgsz).values():
            got_m, got_i = run(embeddings.numpy(), coords.numpy(), labels.numpy())
            want_m, want_i = module.decode(embeddings, torch.zeros(len(coords), dtype=torch.long), **kwargs)
            diff["masks"] = max(diff["masks"], _scaled_diff(got_m, want_m))
            diff["iou"] = max(diff["iou"], _scaled_diff(got_i, want_i))
        diffs["decoder"] = diff
        if tolerance is not None and max(diff.values()) > tolerance:
            raise ExportMismatchError(f"the decoder graph differs from the head's decode by {diff} (> "
                                      f"{tolerance:.0e}); nothing written to {dec_path}")
    diffs["paths"] = {"encoder": str(enc_path), "decoder": str(dec_path)}  # type: ignore[dict-item]
    return diffs

