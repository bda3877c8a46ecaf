"""How an exported graph is checked against the PyTorch student before it is renamed into place:
output by output, detection outputs in their own units, an instance head by the masks its outputs
make (mask coefficients x prototypes, sigmoid), a set-prediction head as a set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import torch

#: Anchors per image whose masks are compared (the highest-scoring ones in PyTorch's output): every
#: anchor at 640 would be 8400 full prototype grids.
MASK_ANCHORS = 100


class ExportMismatchError(RuntimeError):
    """The exported graph does not reproduce the PyTorch student within the tolerance."""


def onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def instance_masks(predictions: torch.Tensor, proto: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The masks an instance head's export outputs make for the chosen anchors: ``predictions``
    (B, 4 + nc + nm, A) (its last nm rows are mask coefficients), ``proto`` (B, nm, h, w), ``anchors``
    (B, K) indices -> (B, K, h, w) mask probabilities, sigmoid(coefficients . prototypes), as
    ultralytics' ``process_mask`` makes them before cropping to the box."""
    nm = proto.shape[1]
    coeffs = torch.gather(predictions[:, -nm:], 2, anchors[:, None].expand(-1, nm, -1))  # (B, nm, K)
    return torch.einsum("bmk,bmhw->bkhw", coeffs, proto).sigmoid()


def top_anchors(predictions: torch.Tensor, num_masks: int, k: int = MASK_ANCHORS) -> torch.Tensor:
    """(B, K) indices of the anchors with the highest class probability (rows 4 .. -num_masks)."""
    scores = predictions[:, 4:-num_masks].amax(1)
    return scores.topk(min(k, scores.shape[-1]), dim=-1).indices


def compare_outputs(got: Sequence[np.ndarray], want: Sequence[torch.Tensor], kinds: Sequence[str],
                    images: torch.Tensor) -> Dict[str, float]:
    """|exported - PyTorch| output by output (``kinds`` from
    :class:`~vfmkd.engine.export.student_graph.ExportedStudent`): ``max_abs`` over every output value;
    for a YOLO detection output also ``boxes_px`` (xywh, input pixels), ``scores`` (probabilities); for
    an instance head ``masks`` (the probabilities of
    :func:`instance_masks` for PyTorch's top anchors, made from each side's own outputs); and
    ``max_scaled``, the largest of ``scores``, ``masks``, ``boxes_px`` / input size and the other
    outputs' differences (prototypes count through their masks). Box coordinates reach ~500 px at 640,
    where one float32 step is 6e-5 px, so boxes are compared in image units. A set-prediction output
    (RT-DETR's queries) is compared as a set (:func:`matched_query_difference`)."""
    if len(got) != len(want):
        raise ExportMismatchError(f"the exported graph has {len(got)} outputs, PyTorch {len(want)}")
    out = {"max_abs": 0.0, "max_scaled": 0.0}
    size = float(max(images.shape[-2:]))
    for i, (g, w, kind) in enumerate(zip(got, want, kinds)):
        if g.shape != tuple(w.shape):
            raise ExportMismatchError(f"output {i} ({kind}) has shape {g.shape} in the exported graph, "
                                      f"{tuple(w.shape)} in PyTorch (input {tuple(images.shape)})")
        d = matched_query_difference(g, w.numpy(), size) if kind == "set" else np.abs(g - w.numpy())
        out["max_abs"] = max(out["max_abs"], float(d.max()) if d.size else 0.0)
        if kind == "proto":
            nm = w.shape[1]
            anchors = top_anchors(want[i - 1], nm)
            masks = (instance_masks(torch.from_numpy(got[i - 1]), torch.from_numpy(g), anchors)
                     - instance_masks(want[i - 1], w, anchors)).abs()
            out["masks"] = max(out.get("masks", 0.0), float(masks.max()))
            out["max_scaled"] = max(out["max_scaled"], out["masks"])
        # (B, 4 + nc [+ nm], anchors): decoded boxes, probabilities [, coefficients]
        elif kind != "part" and d.ndim == 3 and d.shape[1] > 4:
            out["boxes_px"] = max(out.get("boxes_px", 0.0), float(d[:, :4].max()))
            out["scores"] = max(out.get("scores", 0.0), float(d[:, 4:].max()))
            out["max_scaled"] = max(out["max_scaled"], out["boxes_px"] / size, out["scores"])
        else:
            out["max_scaled"] = max(out["max_scaled"], float(d.max()) if d.size else 0.0)
    return out


def matched_query_difference(got: np.ndarray, want: np.ndarray, size: float) -> np.ndarray:
    """|got - want| of a set-prediction head's (B, 4 + nc, Q) output (RT-DETR: boxes in input pixels,
    then class probabilities) with the queries matched one to one per image (Hungarian, on each pair's
    largest difference, boxes in units of ``size``): the queries are an unordered set, and ONNX
    Runtime's TopK may order queries of equal encoder score differently from torch.topk."""
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415 (an ultralytics dependency)

    scale = np.ones(got.shape[1], dtype=np.float64)
    scale[:4] = size
    out = np.empty_like(got)
    for b in range(got.shape[0]):
        g, w = got[b].T.astype(np.float64), want[b].T.astype(np.float64)  # (Q, 4 + nc)
        cost = (np.abs(g[:, None, :] - w[None, :, :]) / scale).max(-1)
        rows, cols = linear_sum_assignment(cost)
        out[b][:, rows] = np.abs(g[rows] - w[cols]).T
    return out
