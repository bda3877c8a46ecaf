"""Teacher-feature cache built by tools/prepare_teacher_features.py with a random-init SAM on real
coco128 images: layout, resume after a real SIGKILL, fingerprint refusal, --verify, dataset reads."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.cache import FeatureCacheReader, FeatureCacheWriter
from vfmkd.core.errors import CacheMismatchError, ConfigError
from vfmkd.datasets import DetectionDataset
from vfmkd.distillation.cached import CachedTargetsDataset, collate_distill
from vfmkd.distillation.targets import QuantizedMap, TeacherTargets
from vfmkd.engine.builders import open_cache
from vfmkd.teachers.base import TeacherFingerprint

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

# Compares numbers with subprocesses / cached passes bit for bit: runs on two threads under xdist (conftest).
pytestmark = pytest.mark.bitexact

COCO = REPO / "datasets" / "coco128"
SPLIT, LIMIT, BATCH, SIZE = "train2017", 6, 2, 128
TEACHER = ["teacher.init=random", f"teacher.input_size={SIZE}"]
THREADS = min(2, os.cpu_count() or 1)  # as conftest: bit-identical results need the same thread count


def tool_args(output: Path, *extra: str) -> list[str]:
    return ["--teacher", "sam", "--dataset", "coco128", "--splits", SPLIT, "--limit", str(LIMIT),
            "--batch-size", str(BATCH), "--output", str(output), "--no-progress", "--features", "all", *extra, *TEACHER]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "sam"
    torch.set_num_threads(THREADS)  # module fixtures run before conftest's autouse _threads
    assert ptf.main(tool_args(out)) == 0
    return out


def test_layout_dtype_chunks_attrs(cache_dir):
    ids = [p.stem for p in sorted((COCO / "images" / SPLIT).glob("*.jpg"))[:LIMIT]]
    with h5py.File(cache_dir / f"{SPLIT}.h5", "r") as f:
        assert list(f["image_ids"].asstr()[:]) == ids
        assert f["done"][:].all() and f["done"].dtype == bool
        for name, c in (("trunk", 768), ("image_embeddings", 256)):
            ds = f["features"][name]
            assert ds.shape == (LIMIT, c, SIZE // 16, SIZE // 16) and ds.dtype == np.float16
            assert ds.chunks == (1, c, SIZE // 16, SIZE // 16) and ds.compression is None
            assert np.isfinite(ds[:]).all() and np.abs(ds[:].astype(np.float32)).sum() > 0
        for i, image_id in enumerate(ids):
            w, h = Image.open(COCO / "images" / SPLIT / f"{image_id}.jpg").size
            assert f["orig_hw"][i].tolist() == [h, w]
            sx, sy, ox, oy = f["affine"][i]
            vh, vw = f["valid_hw"][i]
            assert (ox, oy) == (0, 0) and max(vh, vw) == SIZE  # SAM: longest side to S, pad bottom/right
            assert sx * w == pytest.approx(vw) and sy * h == pytest.approx(vh)
        a = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
        fp = json.loads(a["fingerprint"])
        assert fp["family"] == "sam" and fp["variant"] == "vit_b" and fp["weights"] == "random-init:seed0"
        assert fp["input_size"] == SIZE and a["input_size"] == SIZE
        assert json.loads(a["teacher_config"])["init"] == "random" and json.loads(a["teacher_config"])["type"] == "sam"
        assert [s["name"] for s in json.loads(a["feature_specs"])] == ["trunk", "image_embeddings"]
        assert (a["dataset"], a["split"], a["batch_size"], a["format_version"]) == ("coco128", SPLIT, BATCH, 1)
        assert "vfmkd_version" in a
    reader = FeatureCacheReader(cache_dir / f"{SPLIT}.h5")
    assert reader.fingerprint == TeacherFingerprint(**fp) and reader.input_size == SIZE
    assert reader.index_of(ids[3]) == 3 and reader.missing_ids(ids + ["nope"]) == ["nope"]


def test_default_caches_only_the_primary_feature(tmp_path):
    out = tmp_path / "sam"
    args = ["--teacher", "sam", "--splits", SPLIT, "--limit", "2", "--output", str(out), "--no-progress", *TEACHER]
    assert ptf.main(args) == 0
    reader = FeatureCacheReader(out / f"{SPLIT}.h5")
    assert [s.name for s in reader.feature_specs] == ["image_embeddings"]


def test_resume_after_sigkill_is_bit_identical(cache_dir, tmp_path):
    """A real SIGKILL while batch 2 is computed; the rerun finishes the file bit for bit."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}]
        import torch
        torch.set_num_threads({THREADS})
        from vfmkd.teachers.sam_teacher import SamTeacher
        from vfmkd.engine.commands import prepare_features as ptf
        original, calls = SamTeacher.extract_features, []
        def dying(self, images):
            calls.append(1)
            if len(calls) == 2:  # batch 1 is written and flushed by now
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, images)
        SamTeacher.extract_features = dying
        sys.exit(ptf.main(sys.argv[1:]))
    """))
    out = tmp_path / "resumed"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}  # ultralytics' import sets it to 1 otherwise
    proc = subprocess.run([sys.executable, str(driver), *tool_args(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with h5py.File(out / f"{SPLIT}.h5", "r") as f:
        assert f["done"][:].tolist() == [True] * BATCH + [False] * (LIMIT - BATCH)
    with pytest.raises(CacheMismatchError, match=f"{LIMIT - BATCH} of {LIMIT} images .* Finish the cache with"):
        cached_dataset(out, LIMIT)

    calls = []
    original = FeatureCacheWriter.write
    FeatureCacheWriter.write = lambda self, start, *a: (calls.append(start), original(self, start, *a))[1]
    try:
        assert ptf.main(tool_args(out)) == 0
    finally:
        FeatureCacheWriter.write = original
    assert calls == list(range(BATCH, LIMIT, BATCH))  # only the unfinished batches were recomputed

    with h5py.File(out / f"{SPLIT}.h5", "r") as got, h5py.File(cache_dir / f"{SPLIT}.h5", "r") as want:
        names = []
        want.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert len(names) == 15  # 13 + stats/<name>/phi_s_rotation of its two features (PHI-S, issue 20)
        for n in names:
            assert got[n].dtype == want[n].dtype and np.array_equal(got[n][:], want[n][:]), n
        assert dict(got.attrs) == dict(want.attrs)


def test_other_input_size_is_refused_with_the_difference(cache_dir):
    before = (cache_dir / f"{SPLIT}.h5").read_bytes()
    with pytest.raises(CacheMismatchError) as err:
        ptf.main(tool_args(cache_dir)[:-1] + [f"teacher.input_size={SIZE + 32}"])
    msg = str(err.value)
    assert f"input_size: {SIZE} != {SIZE + 32}" in msg and "--output" in msg and "delete" in msg
    assert (cache_dir / f"{SPLIT}.h5").read_bytes() == before
    with pytest.raises(CacheMismatchError, match="another image list"):
        ptf.main(tool_args(cache_dir, "--limit", str(LIMIT + 1)))


def test_reader_check_matches_names_difference_and_command(cache_dir):
    reader = FeatureCacheReader(cache_dir / f"{SPLIT}.h5")
    reader.check_matches(reader.fingerprint)
    other = TeacherFingerprint(**{**reader.fingerprint.as_dict(), "input_size": 1024, "weights": "abc"})
    with pytest.raises(CacheMismatchError) as err:
        reader.check_matches(other)
    msg = str(err.value)
    assert f"input_size: {SIZE} != 1024" in msg and "weights: 'random-init:seed0' != 'abc'" in msg
    assert "python tools/prepare_teacher_features.py --teacher sam --dataset coco128" in msg
    reader.check_matches(other, ignore=("input_size", "weights"))


def test_verify_reports_cosine(cache_dir, capsys):
    assert ptf.main(tool_args(cache_dir, "--verify", "2")) == 0
    out = capsys.readouterr().out
    assert "0 images written, 6 already cached" in out
    cosines = [float(c) for c in re.findall(r"mean cosine ([0-9.]+)", out)]
    assert len(cosines) == 2 and min(cosines) >= 0.999
    assert "max abs err" in out and "rel L2 err" in out


def test_bad_overrides_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'input_size'"):
        ptf.main(tool_args(tmp_path / "x", "teacher.inputsize=128"))
    with pytest.raises(ConfigError, match="teacher.input_size=512"):
        ptf.main(tool_args(tmp_path / "x", "data.limit=3"))
    assert not (tmp_path / "x").exists()


def cached_dataset(cache_dir: Path, limit: int) -> CachedTargetsDataset:
    """coco128 samples with the SAM cache of ``cache_dir`` attached, as the engine builds them."""
    ds = DetectionDataset(str(COCO), SPLIT, img_size=128, limit=limit)
    entry = {"type": "sam", "feature_path": str(cache_dir), "init": "random", "input_size": SIZE}
    cache = open_cache("sam", entry, "coco128", SPLIT)
    return CachedTargetsDataset(ds, {"sam": cache},
                                {"sam": cache.missing_images(ds.image_ids, ds.orig_sizes, False, limit=limit)})


def test_dataset_reads_teacher_features_in_workers(cache_dir):
    ds = cached_dataset(cache_dir, 4)
    sample, cached = ds[1]
    entry = cached["sam"]
    with h5py.File(cache_dir / f"{SPLIT}.h5", "r") as f:
        want = torch.from_numpy(f["features/image_embeddings"][1])
        want_affine = torch.from_numpy(f["affine"][1])
    assert entry.features["image_embeddings"].dtype == torch.float16
    assert torch.equal(entry.features["image_embeddings"], want) and torch.equal(entry.affine, want_affine)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_distill)
    batches = list(loader)  # forked workers open their own HDF5 handles
    t = batches[0].cached["sam"]
    assert t.features["trunk"].shape == (2, 768, 8, 8) and t.features["image_embeddings"].dtype == torch.float16
    assert t.affine.shape == (2, 4) and t.valid_hw.shape == (2, 2) and t.input_size == SIZE
    assert torch.equal(batches[0].cached["sam"].features["image_embeddings"][1], want)
    in_main = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate_distill)
    for got, ref in zip(batches, in_main, strict=True):  # the workers' shared-memory batches: the same values
        assert_same_targets(got.cached["sam"], ref.cached["sam"])


def test_batched_fetch_hints_the_reads_and_returns_the_same_items(cache_dir, monkeypatch):
    ds = cached_dataset(cache_dir, 4)
    reader = ds.caches["sam"].reader
    hinted = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, size, advice: hinted.append((offset, size, advice)))
    reader.will_need("no-such-image")
    reader.will_need(reader.image_ids[0], flipped=True)  # no flip pass cached: nothing to hint
    assert hinted == []
    items = ds.__getitems__([2, 0, 3])  # what a DataLoader calls for a batch
    sizes = sorted(2 * s.channels * (SIZE // s.stride) ** 2 for s in reader.feature_specs)  # float16 chunks
    assert sorted(size for _, size, _ in hinted) == sorted(sizes * 3)
    assert {a for _, _, a in hinted} == {os.POSIX_FADV_WILLNEED} and len({o for o, _, _ in hinted}) == len(hinted)
    for (sample, cached), i in zip(items, [2, 0, 3], strict=True):
        ref_sample, ref_cached = ds[i]
        assert sample.image_id == ref_sample.image_id and torch.equal(sample.image, ref_sample.image)
        assert_same_targets(cached["sam"], ref_cached["sam"])


def assert_same_targets(got: TeacherTargets, ref: TeacherTargets) -> None:
    assert got.features.keys() == ref.features.keys() and got.input_size == ref.input_size
    for name, fmap in ref.features.items():
        parts = ("values", "scale", "channel_scale") if isinstance(fmap, QuantizedMap) else (None,)
        for k in parts:
            a, b = (fmap, got.features[name]) if k is None else (getattr(fmap, k), getattr(got.features[name], k))
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(got.affine, ref.affine) and torch.equal(got.valid_hw, ref.valid_hw)


def _collate_and_report_sharing(entries):
    batch = TeacherTargets.collate(entries)
    q = batch.features["q"]
    return batch, [t.is_shared() for t in (batch.features["f"], q.values, q.scale, q.channel_scale, batch.affine,
                                           batch.valid_hw)]


def test_collate_stacks_into_shared_memory_in_a_worker():
    # a worker's batch goes to the main process through shared memory: stacked there directly, it is not
    # copied a second time on the way (the cached-target loader's speed, benchmarks/bench_cache_loader.py)
    g = torch.Generator().manual_seed(0)
    items = [TeacherTargets({"f": torch.randn(4, 3, 3, generator=g).half(),
                             "q": QuantizedMap(torch.randint(-127, 128, (4, 3, 3), generator=g, dtype=torch.int8),
                                               torch.rand(3, 3, generator=g), torch.rand(4, generator=g))},
                            torch.rand(4, generator=g), torch.rand(2, generator=g), 48) for _ in range(4)]
    loader = torch.utils.data.DataLoader(items, batch_size=2, num_workers=1, collate_fn=_collate_and_report_sharing)
    for k, (batch, shared) in enumerate(loader):
        assert all(shared), shared
        assert_same_targets(batch, TeacherTargets.collate(items[2 * k:2 * k + 2]))
    assert not TeacherTargets.collate(items[:2]).affine.is_shared()  # outside a worker: ordinary memory


def test_dataset_refuses_a_cache_that_lacks_images(cache_dir, tmp_path):
    with pytest.raises(CacheMismatchError) as err:
        cached_dataset(cache_dir, LIMIT + 2)
    msg = str(err.value)
    assert f"2 of {LIMIT + 2} images" in msg
    assert (
        f"python tools/prepare_teacher_features.py --teacher sam --dataset coco128 --splits {SPLIT} "
        f"--output {cache_dir}" in msg
    )
    assert f"--limit {LIMIT + 2}" in msg and f"delete {cache_dir / (SPLIT + '.h5')}" in msg
    assert "teacher.input_size=128" in msg and "teacher.init=random" in msg
    with pytest.raises(CacheMismatchError, match="no cached features at .*Write them first"):
        cached_dataset(tmp_path / "none", 2)
