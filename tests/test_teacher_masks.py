"""Teacher mask logits: SAM / LoRA-SAM / SAM2 box prompts against the libraries' own predictors, the
mask-logit cache of tools/prepare_teacher_features.py (--outputs features,masks) on real coco128
images (round trip, live equality, resume, stale labels) and the refusals for teachers that cannot
segment. Random-init teachers at input_size 128."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vfmkd.cache.codec import mask_bytes
from vfmkd.cache.fill import prompt_boxes
from vfmkd.cache.reader import FeatureCacheReader
from vfmkd.cache.writer import FeatureCacheWriter
from vfmkd.core.errors import CacheMismatchError, ConfigError
from vfmkd.core.registry import TEACHERS
from vfmkd.datasets import DetectionDataset
from vfmkd.datasets.coco_yolo import parse_labels
from vfmkd.datasets.image_files import load_rgb
from vfmkd.datasets.transforms import GeometricAugment
from vfmkd.distillation.cached import CachedTargetsDataset, collate_distill
from vfmkd.distillation.offline_distiller import OfflineCacheSpec, open_offline_teacher
from vfmkd.distillation.online_distiller import OnlineTeacher
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.teachers.lora_sam_teacher import lora_key

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

# Compares numbers with subprocesses / cached passes bit for bit: runs on two threads under xdist (conftest).
pytestmark = pytest.mark.bitexact

COCO = REPO / "datasets" / "coco128"
SPLIT, LIMIT, BATCH, SIZE = "train2017", 3, 2, 128
SIDE = SIZE // 4
SAM_CFG = {"type": "sam", "variant": "vit_b", "init": "random", "input_size": SIZE}
THREADS = min(2, os.cpu_count() or 1)


def tool_args(output: Path, *extra: str, root: Path = COCO, limit: int = LIMIT) -> list:
    return ["--teacher", "sam", "--dataset", "coco128", "--data-root", str(root), "--splits", SPLIT, "--limit",
            str(limit),
            "--batch-size", str(BATCH), "--output", str(output), "--no-progress", "--outputs", "features,masks", *extra,
            "teacher.init=random", f"teacher.input_size={SIZE}"]


def _images(n: int = 2):
    paths = sorted((COCO / "images" / SPLIT).glob("*.jpg"))[:n]
    return paths, [load_rgb(p) for p in paths]


@pytest.fixture(scope="module", autouse=True)
def _one_build_per_config():
    """The cache tool builds its teacher on every run; a frozen random-init teacher of one config is the
    same model each time, so the module builds each config once (the tests stay fast)."""
    built, build = {}, TEACHERS.build

    def memo(name, where="", **kwargs):
        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in built:
            built[key] = build(name, where=where, **kwargs)
        return built[key]

    logging.getLogger("vfmkd").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TEACHERS, "build", memo)
        yield


@pytest.fixture(scope="module")
def sam():
    torch.set_num_threads(THREADS)
    return TEACHERS.build("sam", variant="vit_b", init="random", input_size=SIZE, checkpoint=None, dtype="float32",
                          device="cpu", seed=0)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """fp16 cache with the flip pass and an int8 one without, of the first LIMIT coco128 images."""
    torch.set_num_threads(THREADS)
    base = tmp_path_factory.mktemp("masks")
    assert ptf.main(tool_args(base / "fp16", "--with-flip")) == 0
    assert ptf.main(tool_args(base / "int8", "--storage", "int8")) == 0
    return base / "fp16" / f"{SPLIT}.h5", base / "int8" / f"{SPLIT}.h5"


def _box_prompts(rows: np.ndarray, image: np.ndarray, affine: torch.Tensor) -> torch.Tensor:
    return prompt_boxes(rows, image.shape[:2], affine)


# ---------------------------------------------------------------------- teachers vs the libraries
def _lora_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(12):
        sd[lora_key(i, "A")] = torch.randn(4, 768, generator=g) * 0.05
        sd[lora_key(i, "B")] = torch.randn(3 * 768, 4, generator=g) * 0.05
    path = tmp_path / "lora.pt"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("name", ["sam", "lora_sam", "sam2"])
def test_mask_logits_equal_the_library_predictor(name, sam, tmp_path):
    """Two images in one batch, boxes of both interleaved: each box's logits equal the predictor's
    ``low_res_logits`` (multimask_output=False) for that box on that image alone."""
    if name == "sam2":
        pytest.importorskip("sam2")
    kwargs = {"sam": dict(variant="vit_b"),
              "lora_sam": dict(variant="vit_b", lora_rank=4, lora_checkpoint=str(_lora_file(tmp_path))),
              "sam2": dict(variant="sam2.1_hiera_tiny")}[name]
    teacher = sam if name == "sam" else TEACHERS.build(name, init="random", input_size=SIZE, **kwargs)
    assert teacher.can_segment
    _, images = _images(2)
    feats, geo = teacher.extract_features(images)
    orig = [np.array([[10, 20, 200, 300], [50.5, 60, 300, 200.25]]), np.array([[0, 0, 120, 90]])]
    teacher_px = [torch.from_numpy(o).float() * geo.affine[i, :2].repeat(2) for i, o in enumerate(orig)]
    boxes = torch.stack([teacher_px[0][0], teacher_px[1][0], teacher_px[0][1]])  # images interleaved
    got = teacher.mask_logits(feats, boxes, torch.tensor([0, 1, 0]))
    assert got.shape == (3, SIDE, SIDE) and got.dtype == torch.float32
    for i, rows in ((0, [0, 2]), (1, [1])):
        _, _, low = teacher.predict_masks(images[i], boxes=orig[i], multimask_output=False)
        torch.testing.assert_close(got[rows], torch.from_numpy(low), atol=1e-5, rtol=1e-4)
    assert got.abs().amax() > 0
    assert teacher.mask_logits(feats, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)).shape == (0, SIDE, SIDE)


def test_teachers_that_cannot_segment_are_named():
    dino = TEACHERS.build("dino", variant="vits16", init="random", input_size=64)
    assert dino.can_segment is False and dino.provides_head_outputs is False
    with pytest.raises(ConfigError, match="teachers that can: lora_sam, sam, sam2"):
        dino.mask_logits({}, torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"teachers\.dino: .*cannot be prompted.*lora_sam, sam, sam2"):
        OnlineTeacher("dino", dino, torch.device("cpu"), masks=True)
    with pytest.raises(ConfigError, match="--outputs masks: the dino teacher .* lora_sam, sam, sam2"):
        ptf.check_outputs(["features", "masks"], "dino", type(dino))
    with pytest.raises(ConfigError, match="features are always cached"):
        ptf.check_outputs(["masks"], "sam", TEACHERS.get("sam"))
    feats, heads = dino.forward_with_heads(dino.preprocess([np.zeros((32, 48, 3), np.uint8)]).pixels)
    assert heads == {} and set(feats) == {s.name for s in dino.feature_specs()}


# ---------------------------------------------------------------------- records
def test_mask_logits_record_collates_and_decodes():
    def entry(k, int8):
        logits = torch.randint(-127, 128, (k, 4, 4), dtype=torch.int8) if int8 else torch.randn(k, 4, 4).half()
        m = MaskLogits(logits=logits, batch_idx=torch.zeros(k, dtype=torch.int64), label_index=torch.arange(k),
                       cls=torch.full((k,), 3), scale=torch.rand(k) if int8 else None, boxes=torch.rand(k, 4))
        return TeacherTargets(features={"f": torch.zeros(1, 2, 2)}, affine=torch.ones(4), valid_hw=torch.ones(2),
                              input_size=16, mask_logits=m)

    for int8 in (False, True):
        parts = [entry(2, int8), entry(0, int8), entry(3, int8)]
        batch = TeacherTargets.collate(parts)
        m = batch.mask_logits
        assert len(m) == 5 and m.batch_idx.tolist() == [0, 0, 2, 2, 2] and m.label_index.tolist() == [0, 1, 0, 1, 2]
        f = batch.to_float(torch.device("cpu")).mask_logits
        assert f.logits.dtype == torch.float32 and f.scale is None
        want = [(p.mask_logits.logits.float() * (p.mask_logits.scale[:, None, None] if int8 else 1)) for p in parts]
        torch.testing.assert_close(f.logits, torch.cat(want))
        assert torch.equal(m.of_image(2).label_index, torch.arange(3))
    with pytest.raises(ValueError, match="some entries have mask logits"):
        TeacherTargets.collate([entry(1, False),
                                TeacherTargets(features={"f": torch.zeros(1, 2, 2)}, affine=torch.ones(4),
                                                               valid_hw=torch.ones(2), input_size=16)])


# ---------------------------------------------------------------------- the cache
def test_cached_masks_round_trip(caches, sam):
    fp16, int8 = caches
    paths, images = _images(LIMIT)
    labels = [parse_labels(COCO / "object_detection" / "labels" / SPLIT / f"{p.stem}.txt", 80) for p in paths]
    feats, geo = sam.extract_features(images)
    idx = torch.cat([torch.full((len(r),), i) for i, r in enumerate(labels)])
    boxes = torch.cat([_box_prompts(r, im, geo.affine[i]) for i, (r, im) in enumerate(zip(labels, images))])
    live = sam.mask_logits(feats, boxes, idx)

    with h5py.File(fp16, "r") as f:
        assert f["masks/offsets"][:].tolist() == np.concatenate([[0], np.cumsum([len(r) for r in labels])]).tolist()
        assert f["masks/logits"].dtype == np.float16 and f["masks/logits"].shape == (len(idx), SIDE, SIDE)
        assert "masks_flip/logits" in f and f["masks_done"][:].all()
    r16, r8 = FeatureCacheReader(fp16), FeatureCacheReader(int8)
    assert (
        r16.has_masks
        and r8.has_masks
        and r16.mask_info["prompt_source"] == f"detection-labels:object_detection/labels/{SPLIT}"
    )
    assert "--outputs features,masks" in r16.rebuild_command() and "--with-flip" in r16.rebuild_command()
    for i, p in enumerate(paths):
        k = len(labels[i])
        e16, e8 = r16.read(p.stem)["masks"], r8.read(p.stem, dequantize=False)["masks"]
        want = live[idx == i]
        assert e16["logits"].dtype == torch.float16 and e16["logits"].shape == (k, SIDE, SIDE)
        assert (
            e16["label_index"].tolist() == list(range(k))
            and e16["cls"].tolist() == labels[i][:, 0].astype(int).tolist()
        )
        torch.testing.assert_close(e16["boxes"], boxes[idx == i])
        torch.testing.assert_close(e16["logits"].float(), want, atol=2e-3, rtol=2e-3)
        assert e8["logits"].dtype == torch.int8 and e8["scale"].shape == (k,)
        dec = e8["logits"].float() * e8["scale"][:, None, None]
        assert ((dec - want).abs() <= e8["scale"][:, None, None] * 0.5 + 1e-3).all()
        t = from_entry = TeacherTargets.collate([_targets(r8, p.stem)])
        assert t.mask_logits.quantized and torch.equal(from_entry.mask_logits.logits, e8["logits"])
    # bytes per image are reported for the benchmark table
    assert mask_bytes("int8", SIDE, False) < mask_bytes("float16", SIDE, False)


def _targets(reader: FeatureCacheReader, image_id: str) -> TeacherTargets:
    from vfmkd.distillation.targets import from_cache_entry
    return from_cache_entry(reader.read(image_id, dequantize=False))


def _offline(path: Path, name: str = "sam"):
    from vfmkd.teachers.sam_teacher import SamTeacher
    kwargs = {k: v for k, v in SAM_CFG.items() if k != "type"}
    return open_offline_teacher(OfflineCacheSpec(name, path, SamTeacher.config_fingerprint(**kwargs),
                                                 "image_embeddings", "rebuild", "sam", kwargs,
                                                 label_dir=COCO / "object_detection" / "labels" / SPLIT))


@pytest.mark.parametrize("flip", [False, True])
def test_cached_masks_equal_a_live_pass_on_the_unaugmented_view(caches, sam, flip):
    """The dataset's view at the teacher's size (mirrored too: the flip pass), cached vs live, in the
    batch's label_index order; live = canvas crop -> teacher, so the pixels differ by the resampling."""
    cache = _offline(caches[0])
    assert cache.has_masks and cache.has_flip
    ds = DetectionDataset(str(COCO), SPLIT, img_size=SIZE, limit=LIMIT,
                          augment=GeometricAugment(fliplr=1.0) if flip else None)
    data = CachedTargetsDataset(ds, {"sam": cache})
    db = collate_distill([data[i] for i in range(LIMIT)])
    cached = db.cached["sam"].to_float(torch.device("cpu")).mask_logits
    live = OnlineTeacher("sam", sam, torch.device("cpu"), masks=True).targets(db.batch).mask_logits
    assert bool(db.batch.views.flipped.all()) == flip
    assert len(live) == len(db.batch.boxes.cls) and live.batch_idx.tolist() == db.batch.boxes.batch_idx.long().tolist()
    assert torch.equal(live.label_index, db.batch.boxes.label_index.long())
    # cached masks hold every label row of each image; pair them by (image, label_index)
    key = {(int(b), int(j)): n for n, (b, j) in enumerate(zip(cached.batch_idx, cached.label_index))}
    pick = torch.tensor([key[(int(b), int(j))] for b, j in zip(live.batch_idx, live.label_index)])
    assert torch.equal(cached.cls[pick], live.cls)
    torch.testing.assert_close(cached.boxes[pick], live.boxes, atol=1.5, rtol=0)
    a, b = cached.logits[pick].flatten(1), live.logits.flatten(1)
    cos = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1)
    # measured at 128 px (random-init SAM, cv2 letterbox vs PIL resize): cosine min 0.91, mean 0.97;
    # mean |difference| 0.2 of the mean |logit|. Pairing the masks wrongly drops the cosine far lower.
    assert cos.min() > 0.85 and cos.mean() > 0.95, cos
    assert (a - b).abs().mean() < 0.3 * a.abs().mean()
    wrong = torch.nn.functional.cosine_similarity(a.roll(1, 0) - a.roll(1, 0).mean(1, keepdim=True),
                                                  b - b.mean(1, keepdim=True), dim=1)
    assert wrong.mean() < cos.mean() - 0.1


def test_resume_of_a_partial_mask_cache_is_identical(caches, tmp_path):
    """An int8 features-only cache gets masks added by the same command with --outputs features,masks;
    that run dies after its first batch and the rerun finishes only the rest, identical to a fresh cache."""
    out = tmp_path / "resume"
    plain = [a for a in tool_args(out, "--storage", "int8") if a not in ("--outputs", "features,masks")]
    assert ptf.main(plain) == 0
    cache = _offline(out / f"{SPLIT}.h5")
    assert not cache.has_masks
    with pytest.raises(CacheMismatchError, match=r"caches features only\. Add them with:\n  python "
                                                 r"tools/prepare_teacher_features.py .*--outputs features,masks"):
        cache.require_masks("loss 'mask_kd' (mask_distill)")

    calls, original = [], FeatureCacheWriter.write

    def dying(self, start, *a):
        if calls:
            raise KeyboardInterrupt  # killed after the first batch was written
        calls.append(start)
        return original(self, start, *a)

    FeatureCacheWriter.write = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            ptf.main(tool_args(out, "--storage", "int8"))
    finally:
        FeatureCacheWriter.write = original
    reader = FeatureCacheReader(out / f"{SPLIT}.h5")
    assert reader.masks_done.tolist() == [True] * BATCH + [False] * (LIMIT - BATCH) and not reader.has_masks
    with pytest.raises(CacheMismatchError, match="does not hold them for every image yet. Finish them with"):
        _offline(out / f"{SPLIT}.h5").require_masks("mask_distill")

    calls.clear()
    FeatureCacheWriter.write = lambda self, start, *a: (calls.append(start), original(self, start, *a))[1]
    try:
        assert ptf.main(tool_args(out, "--storage", "int8")) == 0
    finally:
        FeatureCacheWriter.write = original
    assert calls == list(range(BATCH, LIMIT, BATCH))
    with h5py.File(out / f"{SPLIT}.h5", "r") as got, h5py.File(caches[1], "r") as want:
        names = []
        want.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert "masks/scale" in names
        for n in names:
            assert np.array_equal(got[n][:], want[n][:]), n
        assert got.attrs["masks"] == want.attrs["masks"]


def test_changed_labels_make_the_masks_stale(tmp_path):
    root = tmp_path / "coco"
    paths, _ = _images(2)
    for p in paths:
        (root / "images" / SPLIT).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "images" / SPLIT / p.name)
        labels = root / "object_detection" / "labels" / SPLIT
        labels.mkdir(parents=True, exist_ok=True)
        shutil.copy(COCO / "object_detection" / "labels" / SPLIT / f"{p.stem}.txt", labels / f"{p.stem}.txt")
    out = tmp_path / "cache"
    assert ptf.main(tool_args(out, root=root, limit=2)) == 0
    label = root / "object_detection" / "labels" / SPLIT / f"{paths[1].stem}.txt"
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
    reader = FeatureCacheReader(out / f"{SPLIT}.h5")
    with pytest.raises(
        CacheMismatchError,
        match=r"mask logits are stale: the detection label files .* changed.*\n  "
        r"python tools/prepare_teacher_features.py .*--outputs features,masks",
    ):
        reader.check_labels(label.parent)
    with pytest.raises(CacheMismatchError, match="teachers.sam: .*stale"):
        open_offline_teacher(OfflineCacheSpec("sam", out / f"{SPLIT}.h5", reader.fingerprint, "image_embeddings",
                                              "rebuild", "sam", {k: v for k, v in SAM_CFG.items() if k != "type"},
                                              label_dir=label.parent))
    with pytest.raises(CacheMismatchError, match="label files changed since it was started"):
        ptf.main(tool_args(out, root=root, limit=2))
