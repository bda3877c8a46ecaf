"""Storage codecs and per-channel statistics of the teacher-feature cache (see feature_cache.py).

``float16``: values as float16, 2 B per value. ``int8``: two-factor absmax quantisation per image,
``x ~= q * scale[y, x] * channel_scale[c]`` with ``channel_scale`` = each channel's RMS over the
image's cells and ``scale`` = max over channels of |x / channel_scale| / 127 per cell; ``q`` int8,
both scales float32: 1 B per value + 4 B per cell + 4 B per channel (256x64x64: 1.0166 MiB, fp16 2 MiB).
Why two factors (benchmarks/bench_cache_storage.py): a per-cell scale alone keeps the cosine to fp16
above 0.999 but, when channel scales differ (ViT outlier channels, LayerNorm gains), crushes the small
channels: after per-channel standardisation their RMS error reached 0.6 std (worst channel 1.9;
two-factor: 0.007 and 0.012), with channel gains spread over 10^+-1.5.
The RMS (not absmax) channel factor keeps a few high-norm cells from coarsening every other cell.
Float32 scales cost 0.8% of the bytes and, unlike float16 ones, never go subnormal.
Both storages decode to float16 torch tensors, so readers see the same dtype (and |x| <= 65504)
whatever the storage.

Statistics are per-image moments (mean and sum of squared deviations, float64, over the valid
cells) of the values exactly as the reader returns them; :func:`combine_moments` merges them in
image order, so a resumed run and an uninterrupted one store bit-identical statistics.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch

from vfmkd.cache.phi_s import store_phi_s
from vfmkd.core.feature_spec import FeatureSpec

STORAGES = ("float16", "int8")
FORMAT_VERSIONS = {"float16": 1, "int8": 2}  # older readers know 1 only: they must refuse int8 files
VALUE_DTYPE = {"float16": np.float16, "int8": np.int8}
SCALE_DTYPE = np.float32
#: int8 side arrays: key -> dataset suffix (features/<name><suffix>); per image (h, w) and (C,)
SCALES = {"scale": "_scale", "channel_scale": "_channel_scale"}
QMAX = 127
#: flipped -> (features group, affine dataset, valid_hw dataset)
FLIP_GROUPS = {False: ("features", "affine", "valid_hw"), True: ("features_flip", "affine_flip", "valid_hw_flip")}
GEOMETRY_BYTES = 4 * 2 + 4 * 4 + 4 * 2 + 1  # orig_hw, affine, valid_hw, done


def check_storage(storage: str) -> str:
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    return storage


def feature_bytes(storage: str, channels: int, h: int, w: int) -> int:
    """Bytes one image's (channels, h, w) map occupies in ``storage`` (values + int8 scales)."""
    if check_storage(storage) == "float16":
        return 2 * channels * h * w
    return channels * h * w + np.dtype(SCALE_DTYPE).itemsize * (h * w + channels)


def scale_shapes(channels: int, h: int, w: int) -> Dict[str, Tuple[int, ...]]:
    """Per-image shapes of the int8 side arrays."""
    return {"scale": (h, w), "channel_scale": (channels,)}


def bytes_per_image(specs: Sequence[FeatureSpec], input_size: int, storage: str, with_flip: bool) -> Tuple[int, int]:
    """(feature bytes, other bytes: geometry, done flag and per-image statistics) one image occupies."""
    passes = 2 if with_flip else 1
    feats = passes * sum(feature_bytes(storage, s.channels, input_size // s.stride,
                                       input_size // s.stride) for s in specs)
    other = GEOMETRY_BYTES + (4 * 4 + 4 * 2 if with_flip else 0) + sum(2 * 8 * s.channels for s in specs)
    return feats, other


def stored_layout(attrs: Mapping[str, Any]) -> Tuple[str, bool]:
    """(storage, with_flip) of a file; files from before these options are float16 without a flip pass."""
    storage = attrs.get("storage", "float16")
    return storage.decode() if isinstance(storage, bytes) else str(storage), bool(attrs.get("with_flip", False))


def layout_flags(storage: str, with_flip: bool) -> str:
    return f"--storage {storage} {'with' if with_flip else 'without'} --with-flip"


def alloc_dataset(group: h5py.Group, name: str, shape: Tuple[int, ...], dtype: Any,
                  chunks: Optional[Tuple[int, ...]] = None,
                  compression: Optional[str] = None, fill: Optional[float] = None) -> h5py.Dataset:
    """A dataset allocated at creation, so later writes never touch metadata. Compressed chunks cannot
    be preallocated: a kill mid-write may then corrupt the file."""
    if compression is not None:
        return group.create_dataset(name, shape, dtype, chunks=chunks, compression=compression, shuffle=True)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    fill_kw: Dict[str, Any] = {"fillvalue": fill, "fill_time": "alloc"} if fill is not None else {"fill_time": "never"}
    return group.create_dataset(name, shape, dtype, chunks=chunks, dcpl=dcpl, **fill_kw)


def encode(x: torch.Tensor, storage: str) -> Dict[str, np.ndarray]:
    """(B, C, h, w) float tensor (any device; converted there) -> {"values": (B, C, h, w)
    [, "scale": (B, h, w), "channel_scale": (B, C) float32]} numpy. Raises ValueError on NaN/inf or
    |x| > 65504 (float16's max, what both storages decode to)."""
    x = x.detach().float()
    if x.numel():
        lo, hi = torch.aminmax(x)  # NaN propagates; fails the test below like inf and overflow do
        if not (lo >= -65504 and hi <= 65504):
            raise ValueError("non-finite values (NaN/inf) or overflow above 65504 (float16's max, what the reader "
                             "returns)")
    if check_storage(storage) == "float16":
        return {"values": x.to(torch.float16).cpu().numpy()}
    channel = x.square().mean(dim=(2, 3)).sqrt()  # (B, C) RMS per channel
    y = x * _inverse(channel)[:, :, None, None]
    cell = y.abs().amax(dim=1) / QMAX  # (B, h, w); all-zero cells and channels stay 0
    q = torch.round(y.mul_(_inverse(cell)[:, None])).clamp_(-QMAX, QMAX).to(torch.int8)
    return {"values": q.cpu().numpy(), "scale": cell.cpu().numpy(), "channel_scale": channel.cpu().numpy()}


def _inverse(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, 1.0 / t, torch.zeros_like(t))


def dequantize(values: torch.Tensor, scale: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """int8 (..., C, h, w), float32 scales (..., h, w) and (..., C) -> float16, on their device (batched
    or not): int8 -> f32, two in-place scalings, -> f16. Four vectorised passes; mixed-dtype or float16
    arithmetic is 2-5x slower on CPU, and on a GPU this costs microseconds."""
    return values.float().mul_(scale.unsqueeze(-3)).mul_(channel_scale[..., None, None]).half()


def decode_int8(q: np.ndarray, scale: np.ndarray, channel_scale: np.ndarray) -> torch.Tensor:
    """numpy int8 values and float32 scales -> float16 tensor (see :func:`dequantize`)."""
    return dequantize(torch.from_numpy(q), torch.from_numpy(np.asarray(scale, SCALE_DTYPE)),
                      torch.from_numpy(np.asarray(channel_scale, SCALE_DTYPE)))


def decode(values: np.ndarray, scale: Optional[np.ndarray] = None,
           channel_scale: Optional[np.ndarray] = None) -> torch.Tensor:
    """Stored arrays -> float16 tensor, whatever the storage."""
    if values.dtype == np.int8:
        if scale is None or channel_scale is None:
            raise ValueError("int8 values need their scale and channel_scale arrays")
        return decode_int8(values, scale, channel_scale)
    return torch.from_numpy(values)


def valid_cells(valid_hw: np.ndarray, stride: int, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Rows and columns of valid feature cells, as counts from the top-left: cell j is valid when its
    centre (j + 0.5) * stride lies in [0, valid) (the rule of distillation.geometry's loss mask)."""
    v = np.asarray(valid_hw, np.float64).reshape(-1, 2)
    rows = np.clip(np.ceil(v[:, 0] / stride - 0.5), 0, h).astype(np.int64)
    cols = np.clip(np.ceil(v[:, 1] / stride - 0.5), 0, w).astype(np.int64)
    # The top-left cell always overlaps the image: a summary map (1x1, e.g. a CLS token) of a wide
    # padded image has its one centre outside the image but still describes it.
    return np.maximum(rows, v[:, 0] > 0), np.maximum(cols, v[:, 1] > 0)


def image_moments(x: torch.Tensor | np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, 2, C) float64: [mean, sum of squared deviations] per channel over each
    image's valid top-left rows x cols cells (numpy float64: deterministic, thread-count independent)."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    out = np.zeros((arr.shape[0], 2, arr.shape[1]), np.float64)
    for i in range(arr.shape[0]):
        if rows[i] * cols[i] == 0:
            raise ValueError(f"image {i} of the batch has no valid feature cell (valid region too small)")
        v = arr[i, :, : rows[i], : cols[i]].astype(np.float64).reshape(arr.shape[1], -1)
        mean = v.mean(axis=1)
        out[i, 0] = mean
        out[i, 1] = np.square(v - mean[:, None]).sum(axis=1)
    return out


def combine_moments(counts: np.ndarray, moments: Any, block: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
    """Per-image counts (N,) and moments (N, 2, C) (an array or an h5py dataset, read ``block`` rows
    at a time) -> dataset mean and population std (C,) float64, merged exactly in image order."""
    n = np.asarray(counts, np.float64)
    total = n.sum()
    blocks = [slice(s, min(s + block, len(n))) for s in range(0, len(n), block)]
    mean = sum((n[b, None] * moments[b][:, 0]).sum(axis=0) for b in blocks) / total
    m2 = sum((moments[b][:, 1] + n[b, None] * np.square(moments[b][:, 0] - mean)).sum(axis=0) for b in blocks)
    return mean, np.sqrt(m2 / total)


def add_stats_datasets(f: h5py.File, specs: Sequence[FeatureSpec], n: int) -> None:
    """``stats/<name>/{image_moments (n, 2, C) float64, mean, std (C,) float32}``, NaN until written."""
    for s in specs:
        g = f.require_group(f"stats/{s.name}")
        if "image_moments" not in g:
            alloc_dataset(g, "image_moments", (n, 2, s.channels), np.float64, fill=np.nan)
            alloc_dataset(g, "mean", (s.channels,), np.float32, fill=np.nan)
            alloc_dataset(g, "std", (s.channels,), np.float32, fill=np.nan)


def store_statistics(f: h5py.File, specs: Sequence[FeatureSpec],
                     storage: str) -> Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Once every image of ``f`` is done, store each feature's per-channel mean and std over the valid
    cells of all images and return them ({name: (mean, std)} float64), and then each feature's PHI-S transform
    (:mod:`vfmkd.cache.phi_s`: one more read of at most 256 evenly spaced images); None while images are missing.
    Images without per-image moments (files written before statistics existed) get them from the
    stored features first."""
    if not f["done"][:].all():
        return None
    valid, out = f["valid_hw"][:], {}
    for s in specs:
        g, ds = f[f"stats/{s.name}"], f["features"][s.name]
        rows, cols = valid_cells(valid, s.stride, *ds.shape[2:])
        moments = g["image_moments"]
        for i in np.flatnonzero(np.isnan(moments[:, 0, 0])):
            scales = [f["features"][s.name + x][i:i + 1] for x in SCALES.values()] if storage == "int8" else []
            moments[i:i + 1] = image_moments(decode(ds[i:i + 1], *scales), rows[i:i + 1], cols[i:i + 1])
        mean, std = combine_moments(rows * cols, moments)
        g["mean"][:], g["std"][:] = mean.astype(np.float32), std.astype(np.float32)
        out[s.name] = (mean, std)
    f.flush()
    store_phi_s(f, specs, lambda name, a, b: _decoded_block(f, specs, storage, valid, name, a, b))
    return out


def _decoded_block(f: h5py.File, specs: Sequence[FeatureSpec], storage: str, valid: np.ndarray, name: str,
                   start: int, stop: int) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images start..stop-1 of feature ``name`` as the reader returns them, with their valid rows and cols."""
    spec = next(s for s in specs if s.name == name)
    ds = f["features"][name]
    scales = [f["features"][name + x][start:stop] for x in SCALES.values()] if storage == "int8" else []
    rows, cols = valid_cells(valid[start:stop], spec.stride, *ds.shape[2:])
    return decode(ds[start:stop], *scales), rows, cols


def mirror_affine(affine: torch.Tensor, widths: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The affine of a pass on the horizontally mirrored image, re-expressed for ORIGINAL pixels.

    The mirrored image's pixel x' = W - x lands at teacher x_t = sx * x' + ox, so an original pixel x
    lands at -sx * x + (sx * W + ox): returns (B, 4) = (-sx, sy, sx * W + ox, oy)."""
    a = affine.detach().cpu().to(torch.float64)
    w = torch.as_tensor(np.asarray(widths, np.float64)).reshape(-1)
    out = torch.stack([-a[:, 0], a[:, 1], a[:, 0] * w + a[:, 2], a[:, 3]], dim=1)
    return out.to(torch.float32)


# ---------------------------------------------------------------------- mask logits
#: flipped -> group of the box-prompted mask logits of that pass (see feature_cache.py)
MASK_GROUPS = {False: "masks", True: "masks_flip"}


def encode_masks(x: torch.Tensor, storage: str) -> Dict[str, np.ndarray]:
    """(M, h, w) float mask logits -> {"values": (M, h, w) [, "scale": (M,) float32]} numpy. float16:
    the values; int8: per-mask absmax quantisation ``x ~= q * scale`` (scale = max |x| / 127, 0 for an
    all-zero mask; error <= scale / 2 per pixel). Raises ValueError on NaN/inf or |x| > 65504."""
    x = x.detach().float()
    if x.numel():
        lo, hi = torch.aminmax(x)
        if not (lo >= -65504 and hi <= 65504):
            raise ValueError("non-finite mask logits (NaN/inf) or overflow above 65504 (float16's max)")
    if check_storage(storage) == "float16":
        return {"values": x.to(torch.float16).cpu().numpy()}
    scale = x.abs().amax(dim=(1, 2)) / QMAX if x.numel() else torch.zeros(x.shape[0])
    q = torch.round(x * _inverse(scale)[:, None, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return {"values": q.cpu().numpy(), "scale": scale.cpu().numpy().astype(SCALE_DTYPE)}


def decode_masks(values: np.ndarray, scale: Optional[np.ndarray] = None) -> torch.Tensor:
    """Stored mask logits -> float16 tensor (M, h, w), whatever the storage."""
    if values.dtype == np.int8:
        if scale is None:
            raise ValueError("int8 mask logits need their scale array")
        return (
            torch.from_numpy(values).float() * torch.from_numpy(np.asarray(scale, SCALE_DTYPE))[:, None, None]
        ).half()
    return torch.from_numpy(values)


def mask_bytes(storage: str, side: int, with_flip: bool) -> int:
    """Bytes one cached mask occupies: logits (side x side; + float32 scale for int8) and boxes (4
    float32) per pass, label_index and cls (int64)."""
    per_pass = side * side * (2 if check_storage(storage) == "float16" else 1) + (4 if storage == "int8" else 0) + 16
    return per_pass * (2 if with_flip else 1) + 16
