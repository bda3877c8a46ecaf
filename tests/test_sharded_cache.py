"""Sharded feature caching. Under torchrun (2 gloo ranks on CPU, slow): the indexed cache reads as the
single-process cache, the joined one (--join) equals it bit for bit, and a rank killed mid-shard resumes
on the rerun. In one process (fast, a tiny deterministic teacher): the shard index reads, resumes,
verifies and joins like a single file, and refuses what would read wrong."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmkd.cache import FeatureCacheReader, FeatureCacheWriter
from vfmkd.cache.fill import FillSettings, fill_cache, fill_shards
from vfmkd.cache.shards import index_world, shard_file, shard_range
from vfmkd.cache.verify import verify
from vfmkd.core.errors import CacheMismatchError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint
from vfmkd.datasets.image_files import list_images, load_rgb
from vfmkd.teachers.base import TeacherBatch, resized_hw

REPO = Path(__file__).resolve().parents[1]

SPLIT, LIMIT, BATCH = "train2017", 8, 2


def tool_args(output: Path) -> list[str]:
    return ["--teacher", "sam", "--splits", SPLIT, "--limit", str(LIMIT), "--batch-size", str(BATCH),
            "--output", str(output), "--no-progress", "teacher.init=random", "teacher.input_size=64"]


def torchrun(script: Path, output: Path, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # one thread per rank; the single-process reference runs with one thread too (same fp16 bits)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *tool_args(output), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_cache(got_path: Path, want_path: Path) -> None:
    """Every dataset (dtype, chunks, values) and every attribute equal: as the resume test compares."""
    with h5py.File(got_path, "r") as got, h5py.File(want_path, "r") as want:
        names, got_names = [], []
        want.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        got.visititems(lambda n, o: got_names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(got_names) == sorted(names) and len(names) >= 9
        for n in names:
            assert got[n].dtype == want[n].dtype and got[n].chunks == want[n].chunks, n
            assert np.array_equal(got[n][:], want[n][:]), n
        assert dict(got.attrs) == dict(want.attrs)  # no attribute differs (compute: "cpu torch_threads=1" in both)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The single-process cache, written in a process with the ranks' environment (OMP_NUM_THREADS=1): one
    torch thread and one BLAS thread, so the finalised statistics (PHI-S's eigenvectors of a rank-deficient
    covariance among them) are computed with the same summation order as rank 0's."""
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_teacher_features.py"), *tool_args(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / f"{SPLIT}.h5"


def test_shard_ranges_cover_whole_batches():
    for n in (1, 7, 8, 9, 31):
        for b in (1, 2, 4):
            for w in (1, 2, 3, 5):
                ranges = [shard_range(n, b, r, w) for r in range(w)]
                assert ranges[0][0] == 0 and ranges[-1][1] == n
                assert all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))
                assert all(s % b == 0 for s, _ in ranges)


def assert_same_reads(got_path: Path, want_path: Path) -> None:
    """Every image reads the same (features of each pass, geometry, mask logits), same statistics and ids."""
    got, want = FeatureCacheReader(got_path), FeatureCacheReader(want_path)
    assert got.image_ids == want.image_ids and got.fingerprint == want.fingerprint and got.done.all()
    for image_id in want.image_ids:
        for flipped in (False, True) if want.has_flip else (False,):
            a, b = got.read(image_id, flipped), want.read(image_id, flipped)
            assert torch.equal(a["affine"], b["affine"]) and torch.equal(a["valid_hw"], b["valid_hw"])
            assert all(torch.equal(a["features"][k], v) for k, v in b["features"].items())
            assert all(torch.equal(a["masks"][k], v) for k, v in b.get("masks", {}).items())
    for spec in want.feature_specs:
        assert all(torch.equal(x, y) for x, y in zip(got.stats(spec.name), want.stats(spec.name)))
    got.close()
    want.close()


@pytest.mark.slow
def test_two_rank_sharded_cache_equals_single_process(single, tmp_path):
    out = tmp_path / "sharded"
    proc = torchrun(REPO / "tools" / "prepare_teacher_features.py", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{LIMIT} images written, 0 already cached" in proc.stdout
    # no copy: the split's file is an index over the shards, which stay; locks and temp files are gone
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{SPLIT}.h5", *(shard_file(out / f"{SPLIT}.h5", r, 2).name
                                                                             for r in range(2))])
    assert index_world(out / f"{SPLIT}.h5") == 2
    assert_same_reads(out / f"{SPLIT}.h5", single)


@pytest.mark.slow
def test_rank_killed_mid_shard_resumes_and_equals(single, tmp_path):
    """Rank 1 is SIGKILLed while computing its 2nd batch (its 1st is written); torchrun stops the job.
    The same command again (with --join) resumes each shard and joins them into the single-process file."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}]
        from vfmkd.teachers.sam_teacher import SamTeacher
        from vfmkd.engine.commands import prepare_features as ptf
        original, calls = SamTeacher.extract_features, []
        def dying(self, images):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 2 and not os.environ.get("NO_KILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, images)
        SamTeacher.extract_features = dying
        sys.exit(ptf.main(sys.argv[1:]))
    """))
    out = tmp_path / "killed"
    proc = torchrun(driver, out)
    assert proc.returncode != 0
    assert not (out / f"{SPLIT}.h5").exists()
    shard1 = shard_file(out / f"{SPLIT}.h5", 1, 2)
    with h5py.File(shard1, "r") as f:
        assert f["done"][:].tolist() == [True] * BATCH + [False] * (LIMIT // 2 - BATCH)
    assert (shard1.with_name(shard1.name + ".lock")).exists()  # the killed writer's lock: taken over on the rerun

    os.environ["NO_KILL"] = "1"
    try:
        proc = torchrun(driver, out, "--join")
    finally:
        del os.environ["NO_KILL"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the lock" in proc.stderr
    written = int(proc.stdout.split(" images written")[0].rsplit(" ", 1)[-1])
    assert BATCH <= written <= LIMIT - BATCH  # rank 1's first batch was not recomputed
    assert sorted(p.name for p in out.iterdir()) == [f"{SPLIT}.h5"]
    assert_same_cache(out / f"{SPLIT}.h5", single)


# ---------------------------------------------------------------------- the shard index, in one process
class TinyTeacher:
    """A deterministic CacheTeacher on real images: ``emb`` (B, 8, 4, 4) pooled pixels of the 64 px canvas,
    mask logits (M, 16, 16) from the box and the image's features. Fast enough for the suite."""

    input_size, primary_feature, device = 64, "emb", torch.device("cpu")

    def feature_specs(self):
        return [FeatureSpec("emb", 8, 16)]

    def fingerprint(self) -> TeacherFingerprint:
        return TeacherFingerprint("tiny", "t", "none", 64, "float32", "pool")

    def extract_features(self, images):
        canvas, affine, valid = torch.zeros(len(images), 3, 64, 64), [], []
        for i, im in enumerate(images):
            h, w = resized_hw(*im.shape[:2], 64)
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255
            canvas[i, :, :h, :w] = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]
            affine.append([w / im.shape[1], h / im.shape[0], 0.0, 0.0])
            valid.append([float(h), float(w)])
        pooled = F.avg_pool2d(canvas, 16)
        feats = torch.cat([pooled, pooled.square(), pooled.mean(1, keepdim=True) - 0.5,
                           pooled[:, :1] * 3], dim=1)
        return {"emb": feats}, TeacherBatch(canvas, torch.tensor(affine), torch.tensor(valid))

    def mask_logits(self, features, boxes, batch_idx):
        emb = F.interpolate(features["emb"].float(), size=(16, 16), mode="nearest")[batch_idx, 0]
        return emb + boxes.sum(1)[:, None, None] / 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, coco128):
    """(image paths, box prompts, a single-file cache, an index over 3 shards) of 6 images, batch 2,
    int8 with flip pass and mask logits: every virtual and copied dataset kind."""
    from vfmkd.engine.commands.prepare_features import label_prompts

    out = tmp_path_factory.mktemp("tiny")
    paths = list_images(coco128, SPLIT, 6)
    prompts = label_prompts(coco128, SPLIT, paths, 80)
    single, index = out / "single" / f"{SPLIT}.h5", out / "sharded" / f"{SPLIT}.h5"
    fill_cache(tiny_settings(), TinyTeacher(), SPLIT, single, paths, load_rgb, "cpu", prompts)
    fill_shards(tiny_settings(), TinyTeacher(), SPLIT, index, paths, load_rgb, "cpu", 0, 1, 3, prompts)
    return paths, prompts, single, index


def tiny_settings(**kw) -> FillSettings:
    return FillSettings("tiny", {"type": "tiny"}, "coco128", "", 2, storage="int8", with_flip=True, progress=False,
                        **kw)


def test_shard_index_reads_as_the_single_file(tiny):
    paths, _, single, index = tiny
    assert index_world(index) == 3 and index_world(single) is None
    assert index.stat().st_size < 64 * 1024  # an index: the features stay in the shards
    assert_same_reads(index, single)
    with h5py.File(index, "r") as got, h5py.File(single, "r") as want:  # h5py sees one cache (virtual datasets)
        assert got["features/emb"].is_virtual and got["masks_flip/logits"].is_virtual
        for name in ("features/emb", "features_flip/emb_scale", "masks/logits", "masks/offsets", "masks/cls",
                     "stats/emb/image_moments", "stats/emb/mean", "done", "affine_flip"):
            assert np.array_equal(got[name][:], want[name][:]), name
        assert json.loads(got.attrs["masks"]) == json.loads(want.attrs["masks"])
    reader = FeatureCacheReader(index)
    assert reader.has_masks and reader.bytes_per_image() == FeatureCacheReader(single).bytes_per_image()
    reader.check_labels(REPO / "datasets" / "coco128" / "object_detection" / "labels" / SPLIT)
    assert verify(TinyTeacher(), index, paths, load_rgb, 3, 0, 2)


def test_read_hints_reach_the_shard_files(tiny, monkeypatch):
    # FeatureCacheReader.will_need (the loader's cold-cache read-ahead): each image's raw chunks (int8 values
    # and both scales, of the pass asked for) in the file that holds them, a shard for an index
    _, _, single, index = tiny
    hinted = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, size, advice: hinted.append(
        (Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, size, advice)))
    sizes = {}
    for path in (single, index):
        reader, hinted[:] = FeatureCacheReader(path), []
        for image_id in reader.image_ids:
            reader.will_need(image_id, flipped=True)
        sizes[path] = [size for _, _, size, _ in hinted]
        files = {name for name, _, _, _ in hinted}
        assert files == ({p.name for p, _, _ in reader.shards} if path == index else {single.name}), files
        assert len(hinted) == 3 * len(reader.image_ids) and {a for *_, a in hinted} == {os.POSIX_FADV_WILLNEED}
        reader.close()
    assert sizes[index] == sizes[single]


def test_shard_index_resumes_refuses_and_joins(tiny, tmp_path):
    paths, prompts, single, index = tiny
    work = tmp_path / "copy"
    shutil.copytree(index.parent, work)
    index = work / index.name
    with h5py.File(shard_file(index, 2, 3), "r+") as f:  # shard 2 killed mid-batch: its last batch unfinished
        f["done"][1] = False
        f["features/emb"][1] = 0
    with pytest.raises(CacheMismatchError, match="is the index over the shard files"):
        FeatureCacheWriter(index, [p.stem for p in paths], TinyTeacher().fingerprint(), TinyTeacher().feature_specs(),
                           64, teacher_config={}, dataset="coco128", split=SPLIT, batch_size=2)
    written, _ = fill_cache(tiny_settings(), TinyTeacher(), SPLIT, index, paths, load_rgb, "cpu", prompts)
    assert written == 2  # one process resumes the index's shards: only the unfinished batch
    assert_same_reads(index, single)
    shard_file(index, 1, 3).rename(work / "elsewhere.h5")
    with pytest.raises(CacheMismatchError, match=r"shard1of3\.h5 is missing"):
        FeatureCacheReader(index)
    (work / "elsewhere.h5").rename(shard_file(index, 1, 3))
    fill_cache(tiny_settings(join=True), TinyTeacher(), SPLIT, index, paths, load_rgb, "cpu", prompts)
    assert sorted(p.name for p in work.iterdir()) == [index.name]  # joined: one file, shards removed
    with h5py.File(index, "r") as got, h5py.File(single, "r") as want:
        assert not got["features/emb"].is_virtual
        for name in ("features/emb", "masks_flip/logits", "stats/emb/std"):
            assert np.array_equal(got[name][:], want[name][:]), name
