"""Cache storage options of tools/prepare_teacher_features.py on real coco128 images with a random-init
SAM: int8 storage, per-channel statistics, the flip pass, and their resume rules.

The teacher costs ~1.6 s per image at any input <= 224 on 2 CPU cores (SAM pads to 14x14 windows), so
inside tool runs ``extract_features`` is memoised per image: every image and mirrored image is computed
once, by the real teacher, one image per forward. Comparisons with a directly built teacher therefore
see the very same arithmetic (one image per forward), and the tool runs stay a few seconds each.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmkd.cache import FeatureCacheReader, FeatureCacheWriter, codec
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.datasets import load_rgb
from vfmkd.teachers.base import TeacherBatch, TeacherFingerprint
from vfmkd.teachers.sam_teacher import SamTeacher

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

# Compares numbers with subprocesses / cached passes bit for bit: runs on two threads under xdist (conftest).
pytestmark = pytest.mark.bitexact

COCO = REPO / "datasets" / "coco128"
SPLIT, LIMIT, BATCH, SIZE, SIDE = "train2017", 4, 2, 128, 8
TEACHER = ["teacher.init=random", f"teacher.input_size={SIZE}"]
NAMES = ("trunk", "image_embeddings")
_MEMO: dict = {}


def tool_args(output: Path, *extra: str) -> list[str]:
    return ["--teacher", "sam", "--dataset", "coco128", "--splits", SPLIT, "--limit", str(LIMIT), "--batch-size",
            str(BATCH), "--output", str(output), "--no-progress", "--features", "all", *extra, *TEACHER]


@contextlib.contextmanager
def memoised_teacher():
    """SamTeacher.extract_features, computed once per (input size, image) and one image per forward."""
    original = SamTeacher.extract_features

    def extract(self, images):
        outs = []
        for img in images:
            key = (self.input_size, img.shape, hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest())
            if key not in _MEMO:
                _MEMO[key] = original(self, [img])
            outs.append(_MEMO[key])
        feats = {k: torch.cat([o[0][k] for o in outs]) for k in outs[0][0]}
        geo = TeacherBatch(*(torch.cat([getattr(o[1], f) for o in outs]) for f in ("pixels", "affine", "valid_hw")))
        return feats, geo

    SamTeacher.extract_features = extract
    try:
        yield
    finally:
        SamTeacher.extract_features = original


def run_tool(*args: str) -> int:
    with memoised_teacher():
        return ptf.main(list(args))


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """float16 + flip, int8 + flip, and an int8 + flip run crashed after batch 1 then resumed."""
    root = tmp_path_factory.mktemp("storage")
    torch.set_num_threads(2)
    out = {"f16": root / "f16", "i8": root / "i8", "resumed": root / "resumed"}
    assert run_tool(*tool_args(out["f16"], "--with-flip")) == 0
    assert run_tool(*tool_args(out["i8"], "--storage", "int8", "--with-flip")) == 0
    original, calls = FeatureCacheWriter.write, []

    def crashing(self, start, *a):
        if calls:
            raise Crash
        calls.append(start)
        return original(self, start, *a)

    FeatureCacheWriter.write = crashing
    try:
        with pytest.raises(Crash):
            run_tool(*tool_args(out["resumed"], "--storage", "int8", "--with-flip"))
    finally:
        FeatureCacheWriter.write = original
    partial = FeatureCacheReader(out["resumed"] / f"{SPLIT}.h5")
    assert partial.done.tolist() == [True] * BATCH + [False] * (LIMIT - BATCH)
    assert partial.stats("image_embeddings") is None  # statistics wait for the last image
    assert run_tool(*tool_args(out["resumed"], "--storage", "int8", "--with-flip")) == 0
    return {k: v / f"{SPLIT}.h5" for k, v in out.items()}


def ids():
    return [p.stem for p in sorted((COCO / "images" / SPLIT).glob("*.jpg"))[:LIMIT]]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float(), dim=0, eps=1e-12).mean().item()


def test_int8_cosine_and_bytes_per_image(caches):
    f16, i8 = FeatureCacheReader(caches["f16"]), FeatureCacheReader(caches["i8"])
    assert (f16.storage, i8.storage, f16.has_flip, i8.has_flip) == ("float16", "int8", True, True)
    for image_id in ids():
        for flipped in (False, True):
            a, b = f16.read(image_id, flipped=flipped), i8.read(image_id, flipped=flipped)
            for name in NAMES:
                x, y = a["features"][name].float(), b["features"][name].float()
                assert cosine(x, y) >= 0.999
                std = f16.stats(name)[1][:, None, None]  # error in units of each channel's std: ~1%
                assert ((y - x) / std).square().mean().sqrt() < 0.02
    per_image = {name: c * SIDE * SIDE + 4 * SIDE * SIDE + 4 * c for name, c in zip(NAMES, (768, 256))}
    with h5py.File(caches["i8"], "r") as f, h5py.File(caches["f16"], "r") as g:
        assert f.attrs["storage"] == "int8" and f.attrs["format_version"] == 2 and g.attrs["format_version"] == 1
        for group in ("features", "features_flip"):
            for name, c in zip(NAMES, (768, 256)):
                q, s, cs = f[group][name], f[group][name + "_scale"], f[group][name + "_channel_scale"]
                assert q.dtype == np.int8 and q.chunks == (1, c, SIDE, SIDE) and s.dtype == cs.dtype == np.float32
                assert (s.shape, cs.shape) == ((LIMIT, SIDE, SIDE), (LIMIT, c))
                assert sum(d.id.get_storage_size() for d in (q, s, cs)) == LIMIT * per_image[name]
                assert g[group][name].id.get_storage_size() == LIMIT * 2 * c * SIDE * SIDE
    feats, other = i8.bytes_per_image()
    assert feats == 2 * sum(per_image.values()) and other == 33 + 24 + 16 * (768 + 256)
    sam_1024 = codec.feature_bytes("int8", 256, 64, 64)  # SAM image_embeddings at 1024
    assert sam_1024 == 256 * 4096 + 4 * 4096 + 4 * 256 and sam_1024 <= 1.05 * 2**20
    assert codec.feature_bytes("float16", 256, 64, 64) == 2 * 2**20


def test_int8_read_has_the_fp16_shapes_and_dtypes(caches):
    f16, i8 = FeatureCacheReader(caches["f16"]), FeatureCacheReader(caches["i8"])
    for flipped in (False, True):
        a, b = f16.read(ids()[1], flipped=flipped), i8.read(ids()[1], flipped=flipped)
        assert a.keys() == b.keys() and a["features"].keys() == b["features"].keys() == set(NAMES)
        for name in NAMES:
            x, y = a["features"][name], b["features"][name]
            assert x.shape == y.shape and x.dtype == y.dtype == torch.float16
        for key in ("affine", "valid_hw"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
        assert a["input_size"] == b["input_size"] == SIZE
    # deferred dequantisation (e.g. on the GPU after collation) gives the very same tensors
    raw = [i8.read(i, dequantize=False)["features"]["trunk"] for i in ids()[:2]]
    assert (
        raw[0]["values"].dtype == torch.int8
        and raw[0]["scale"].shape == (SIDE, SIDE)
        and raw[0]["channel_scale"].shape == (768,)
    )
    batch = codec.dequantize(*(torch.stack([r[k] for r in raw]) for k in ("values", "scale", "channel_scale")))
    assert torch.equal(batch, torch.stack([i8.read(i)["features"]["trunk"] for i in ids()[:2]]))
    assert torch.equal(f16.read(ids()[0], dequantize=False)["features"]["trunk"],
                       f16.read(ids()[0])["features"]["trunk"])


def test_stats_equal_numpy_over_valid_cells(caches):
    for kind in ("f16", "i8"):
        reader = FeatureCacheReader(caches[kind])
        for name in NAMES:
            cells = []
            for image_id in ids():
                sample = reader.read(image_id)
                vh, vw = sample["valid_hw"].tolist()
                centres = (np.arange(SIDE) + 0.5) * 16  # a cell counts when its centre is in the valid region
                x = sample["features"][name].numpy().astype(np.float64)
                cells.append(x[:, centres < vh][:, :, centres < vw].reshape(x.shape[0], -1))
            assert min(c.shape[1] for c in cells) < SIDE * SIDE  # padding exists and is excluded
            allx = np.concatenate(cells, axis=1)
            mean, std = reader.stats(name)
            assert mean.dtype == std.dtype == torch.float32 and mean.shape == (allx.shape[0],)
            np.testing.assert_allclose(mean.numpy(), allx.mean(axis=1), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(std.numpy(), allx.std(axis=1), rtol=1e-5, atol=1e-6)


def test_resumed_run_is_bit_identical_including_stats(caches):
    with h5py.File(caches["resumed"], "r") as got, h5py.File(caches["i8"], "r") as want:
        names = []
        want.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert {"stats/trunk/mean", "stats/image_embeddings/std", "features_flip/trunk_scale"} <= set(names)
        for n in names:
            assert got[n].dtype == want[n].dtype and np.array_equal(got[n][:], want[n][:]), n
        assert dict(got.attrs) == dict(want.attrs)


def test_flip_pass_is_the_teacher_on_the_mirrored_image(caches):
    torch.manual_seed(0)  # the tool's --seed: the same random weights
    teacher = SamTeacher(init="random", input_size=SIZE)
    reader = FeatureCacheReader(caches["f16"])
    image_id = ids()[2]
    img = load_rgb(COCO / "images" / SPLIT / f"{image_id}.jpg")
    h, w = img.shape[:2]
    direct, geo = teacher.extract_features([img[:, ::-1]])
    cached, plain = reader.read(image_id, flipped=True), reader.read(image_id)
    for name in NAMES:
        assert torch.equal(cached["features"][name], direct[name][0].half())
        assert not torch.allclose(cached["features"][name].float(), plain["features"][name].float().flip(-1), atol=0.1)
    assert torch.equal(cached["valid_hw"], geo.valid_hw[0].float())
    sx, sy, ox, oy = cached["affine"].tolist()
    msx, msy, mox, moy = geo.affine[0].tolist()  # the mirrored image's own affine (its pixel x' = W - x)
    assert sx < 0 and (sy, oy) == (msy, moy)
    for x in (0.0, 13.5, w / 3, w):  # original pixel x sits where the teacher saw the mirrored pixel W - x
        assert x * sx + ox == pytest.approx(msx * (w - x) + mox, abs=1e-3)
    assert ox == pytest.approx(cached["valid_hw"][1].item(), abs=1e-3) and w * sx + ox == pytest.approx(0, abs=1e-3)
    pa = plain["affine"].tolist()
    assert (sx, ox) == pytest.approx((-pa[0], pa[0] * w + pa[2]), abs=1e-5)


def test_verify_checks_int8_and_flip_pass(caches, capsys):
    assert run_tool(*tool_args(caches["i8"].parent, "--storage", "int8", "--with-flip", "--verify", "2")) == 0
    out = capsys.readouterr().out
    assert "0 images written, 4 already cached" in out and "storage int8, with flip pass" in out
    assert "affine (flip pass) matches" in out
    cosines = [float(c) for c in re.findall(r"mean cosine ([0-9.]+)", out)]
    assert len(cosines) == 4 and min(cosines) >= 0.999
    assert re.search(r"\d+ bytes per cached image", out)


def test_resume_with_other_storage_or_flip_is_refused(caches):
    path = caches["i8"]
    before = path.read_bytes()
    with pytest.raises(CacheMismatchError, match=r"started with --storage int8 with --with-flip, this run has "
                                                 r"--storage float16"):
        run_tool(*tool_args(path.parent, "--with-flip"))
    with pytest.raises(CacheMismatchError, match=r"this run has --storage int8 without --with-flip.*another --output"):
        run_tool(*tool_args(path.parent, "--storage", "int8"))
    assert path.read_bytes() == before


# ---------------------------------------------------------------- writer/codec level, no teacher

SPECS = (FeatureSpec("emb", 16, 16),)
FP = TeacherFingerprint("x", "y", "random-init", 64, "float32", "p")


def write_cache(path, feats, storage="float16", with_flip=False, valid=(48.0, 64.0)):
    n = feats.shape[0]
    w = FeatureCacheWriter(path, [f"im{i}" for i in range(n)], FP, SPECS, 64, teacher_config={"type": "x"}, dataset="d",
                           split="s", batch_size=n, storage=storage, with_flip=with_flip)
    with w:
        geo = (torch.tensor([[0.5, 0.5, 0.0, 0.0]] * n), torch.tensor([list(valid)] * n))
        w.write(0, {"emb": feats}, *geo, np.full((n, 2), 128), ({"emb": feats}, *geo) if with_flip else None)
        w.finalize()
    return FeatureCacheReader(path)


def test_int8_codec_small_values_zero_cells_and_uneven_channels():
    x = torch.randn(2, 32, 4, 4)
    x[0, :, 1, 1] = 0  # an all-zero cell, and an all-zero channel, decode to zeros, not NaN
    x[1, 5] = 0
    for scale in (1e-4, 1e-2, 1.0, 1e3):  # float32 scales: accurate down to float16's own range
        y = codec.decode(*codec.encode(x * scale, "int8").values()).float() / scale
        assert torch.equal(y[0, :, 1, 1], torch.zeros(32)) and torch.equal(y[1, 5], torch.zeros(4, 4))
        assert ((y - x).norm() / x.norm()).item() < 0.01
        assert F.cosine_similarity(x, y, dim=1, eps=1e-30)[x.abs().amax(1) > 0].min() > 0.999
    # channel scales over 3 decades: every channel keeps ~1% error in its own units (per-cell scales alone: up to 100%)
    x = torch.randn(2, 64, 8, 8) * torch.logspace(-1.5, 1.5, 64)[None, :, None, None]
    y = codec.decode(*codec.encode(x, "int8").values()).float()
    per_channel = ((y - x).square().mean((0, 2, 3)) / x.square().mean((0, 2, 3))).sqrt()
    assert per_channel.max() < 0.02
    for storage in codec.STORAGES:
        with pytest.raises(ValueError, match="overflow above 65504"):
            codec.encode(x * 1e5, storage)


def test_reader_without_flip_pass_and_files_from_before_stats(tmp_path):
    feats = torch.randn(3, 16, 4, 4) * 5 + 2
    reader = write_cache(tmp_path / "plain.h5", feats)
    assert not reader.has_flip and reader.stats("emb") is not None
    with pytest.raises(CacheMismatchError, match="(?s)built without --with-flip.*--features emb --with-flip"):
        reader.read("im0", flipped=True)
    with pytest.raises(KeyError, match="caches emb"):
        reader.stats("trunk")
    want = [t.numpy().copy() for t in reader.stats("emb")]
    # 48/16 rows
    np.testing.assert_allclose(want[0], feats[:, :, :3].half().double().mean((0, 2, 3)).numpy(), rtol=1e-5)
    with h5py.File(tmp_path / "plain.h5", "r+") as f:  # as written before storage/flip/statistics existed
        del f["stats"], f.attrs["storage"], f.attrs["with_flip"]
    old = FeatureCacheReader(tmp_path / "plain.h5")
    assert (old.storage, old.has_flip, old.stats("emb")) == ("float16", False, None)
    assert torch.equal(old.read("im1")["features"]["emb"], feats[1].half())
    old.close()  # HDF5 refuses a read-write open while this process holds the file read-only
    w = FeatureCacheWriter(tmp_path / "plain.h5", ["im0", "im1", "im2"], FP, SPECS, 64, teacher_config={}, dataset="d",
                           split="s", batch_size=3)
    with w:  # a rerun of the tool on an old finished file adds the statistics from the stored features
        assert len(w.missing()) == 0 and w.finalize() is not None
    got = FeatureCacheReader(tmp_path / "plain.h5").stats("emb")
    assert all(np.array_equal(g.numpy(), x) for g, x in zip(got, want))
