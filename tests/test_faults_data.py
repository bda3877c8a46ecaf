"""Fault suite, data and cache paths (issue 10): EXIF orientation, no run-time installs and the real
decode error, corrupted (NaN/inf) cache values, cache-writer locks, duplicate label lines,
``--splits a b key=value``, truncated/foreign HDF5 caches, decompression bombs, YAML tags, and an
output that is a file, unwritable or on a full disk. Each test asserts nothing is lost or hidden."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from vfmkd.cache import FeatureCacheReader, FeatureCacheWriter
from vfmkd.cache import format as fc
from vfmkd.cache.lock import CacheLockedError
from vfmkd.core.config import load_experiment
from vfmkd.core.errors import CacheMismatchError, ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint
from vfmkd.datasets import DetectionDataset, check_images, load_rgb
from vfmkd.datasets.image_files import probe_image
from vfmkd.utils.cli import run_tool

REPO = Path(__file__).resolve().parents[1]
from coco_fixture_sets import COCO, SPLIT, coco_image, new_root  # noqa: E402

from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

TEACHER = ["teacher.init=random", "teacher.input_size=64"]
FP = TeacherFingerprint(family="t", variant="v", weights="random-init:seed0", input_size=32, dtype="float32",
                        preprocessing="p")
SPECS = (FeatureSpec(name="emb", channels=8, stride=16),)



def label_of(image: Path) -> Path:
    return COCO / "object_detection" / "labels" / SPLIT / f"{image.stem}.txt"


def tool(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", "sam", "--data-root", str(root), "--splits", SPLIT, "--batch-size", "2", "--output", str(out),
            "--no-progress", *extra, *TEACHER]


def small_cache(path: Path, n: int = 3, storage: str = "float16") -> list[str]:
    """A finished cache of n images written by FeatureCacheWriter (no teacher needed)."""
    ids = [f"img{i}" for i in range(n)]
    with FeatureCacheWriter(path, ids, FP, SPECS, 32, teacher_config={"type": "sam", "init": "random"}, dataset=
                            "coco128",
                            split=SPLIT, batch_size=n, teacher="sam", storage=storage) as w:
        w.write(0, {"emb": torch.randn(n, 8, 2, 2)}, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n),
                torch.full((n, 2), 32.0), np.full((n, 2), 32))
        w.finalize()
    return ids


# 1. EXIF orientation -----------------------------------------------------------------------------

def test_exif_rotated_photo_is_seen_upright_by_student_and_teacher(tmp_path):
    root = new_root(tmp_path)
    src = coco_image(1)
    upright = Image.open(src).convert("RGB")  # 640x480-ish, landscape, with labels for this orientation
    w, h = upright.size
    assert w != h
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the sensor stored the picture sideways
    images = root / "images" / SPLIT
    upright.save(images / "a_upright.png")  # lossless: the pixels must match exactly
    upright.transpose(Image.Transpose.ROTATE_90).save(images / "b_phone.png", exif=exif)
    upright.transpose(Image.Transpose.ROTATE_90).save(images / "c_phone.jpg", exif=exif, quality=95)
    for stem in ("a_upright", "b_phone", "c_phone"):
        shutil.copy(label_of(src), root / "object_detection" / "labels" / SPLIT / f"{stem}.txt")
    assert Image.open(images / "b_phone.png").size == (h, w)  # stored sideways

    for name in ("b_phone.png", "c_phone.jpg"):
        assert probe_image(images / name) == (h, w)  # the upright size, also for the 1/8 JPEG draft
        assert load_rgb(images / name).shape == (h, w, 3)
    assert np.array_equal(load_rgb(images / "b_phone.png"), np.asarray(upright))
    # JPEG re-encoding
    assert np.abs(load_rgb(images / "c_phone.jpg").astype(int) - np.asarray(upright).astype(int)).mean() < 8

    ds = DetectionDataset(str(root), SPLIT, img_size=128)
    assert ds.orig_sizes == [(h, w)] * 3
    a, b = ds[0], ds[1]
    assert b.view.orig_hw == (h, w) and torch.equal(a.image, b.image)  # same canvas, same boxes
    assert torch.equal(a.boxes.boxes, b.boxes.boxes) and len(a.boxes.cls) > 0

    out = tmp_path / "cache"
    assert ptf.main(tool(root, out, "--limit", "2")) == 0
    reader = FeatureCacheReader(out / f"{SPLIT}.h5")
    assert reader.orig_hw.tolist() == [[h, w], [h, w]]
    fa, fb = reader.read("a_upright"), reader.read("b_phone")
    assert torch.equal(fa["features"]["image_embeddings"], fb["features"]["image_embeddings"])
    assert torch.equal(fa["affine"], fb["affine"])


# 2. no run-time installs; the real decode error ---------------------------------------------------

def test_unreadable_images_report_pillows_reason_and_install_nothing(tmp_path, monkeypatch, caplog):
    import ultralytics.utils.checks as checks
    import ultralytics.utils.patches  # noqa: F401  (patches PIL.Image.open, as any ultralytics import does)

    calls = []
    monkeypatch.setattr(checks, "check_requirements", lambda *a, **k: calls.append(a) or False)
    assert checks.AUTOINSTALL is False and os.environ["YOLO_AUTOINSTALL"] == "False"
    root = new_root(tmp_path)
    shutil.copy(coco_image(0), root / "images" / SPLIT)
    (root / "images" / SPLIT / "zero.jpg").write_bytes(b"")
    (root / "images" / SPLIT / "notes.jpg").write_text("not an image, just text\n" * 20)
    with caplog.at_level(logging.WARNING, logger="vfmkd"):
        ds = DetectionDataset(str(root), SPLIT, img_size=64)
    assert len(ds) == 1 and calls == []
    reasons = dict((Path(p).name, why) for p, why in ds.skipped)
    assert sorted(reasons) == ["notes.jpg", "zero.jpg"]
    for name, why in reasons.items():
        assert why.startswith("UnidentifiedImageError: cannot identify image file") and name in why
    log = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 2 of 3 images" in log and "pi_heif" not in log and "pi-heif" not in log


def test_auto_install_is_off_whatever_the_import_order():
    code = ("import os; os.environ['YOLO_AUTOINSTALL'] = 'True'; import vfmkd.datasets; import "
            "ultralytics.utils.checks as c; import ultralytics.utils as u; print(c.AUTOINSTALL, u.AUTOINSTALL, "
            "os.environ['YOLO_AUTOINSTALL'])")
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    got = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["False", "False", "False"]


# 3. NaN/inf inside a cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_non_finite_cached_values_are_caught_when_read(tmp_path, storage):
    path = tmp_path / "sam" / f"{SPLIT}.h5"
    ids = small_cache(path, storage=storage)
    key = "features/emb" if storage == "float16" else "features/emb_scale"
    with h5py.File(path, "r+") as f:  # damage after writing (a disk or copy error)
        f[key][1, 0, 0] = np.nan if storage == "float16" else np.inf
    reader = FeatureCacheReader(path)
    reader.read(ids[0]), reader.read(ids[2], dequantize=False)  # intact images still read
    with pytest.raises(fc.CorruptCacheError) as err:
        reader.read(ids[1], dequantize=False)  # as the training loader reads (cached.py)
    msg = str(err.value)
    assert str(path) in msg and f"'{ids[1]}'" in msg and key in msg and "learning-rate" in msg
    assert "python tools/prepare_teacher_features.py --teacher sam --dataset coco128 --splits train2017" in msg
    assert FeatureCacheReader(path, check_finite=False).read(ids[1]) is not None


def test_finite_check_is_exact_and_cheap():
    x = np.random.default_rng(0).standard_normal((256, 64, 64)).astype(np.float16)
    x[0, 0, 0], x[0, 0, 1] = 65504, -65504  # the largest finite float16 values
    assert fc.finite_values(x)
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        y = x.copy()
        y[200, 63, 63] = bad
        assert not fc.finite_values(y)
    t = time.perf_counter()
    for _ in range(20):
        fc.finite_values(x)
    assert (time.perf_counter() - t) / 20 < 0.01  # ~0.1 ms here; numpy's float16 isfinite is ~3 ms


# 4. two writers on one cache ------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from vfmkd.core.feature_spec import FeatureSpec
    from vfmkd.core.fingerprint import TeacherFingerprint
    from vfmkd.cache.writer import FeatureCacheWriter
    FP = TeacherFingerprint(family="t", variant="v", weights="random-init:seed0", input_size=32, dtype="float32",
                            preprocessing="p")
    SPECS = (FeatureSpec(name="emb", channels=8, stride=16),)
    w = FeatureCacheWriter({path!r}, ["img0", "img1", "img2"], FP, SPECS, 32,
                           teacher_config={{"type": "sam", "init": "random"}}, dataset="coco128", split="train2017",
                           batch_size=3, teacher="sam")
    print("writing", flush=True)
    sys.stdin.readline()
    w.close()
""")


def start_writer(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(path=str(path))], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_second_writer_refuses_and_a_dead_writers_lock_is_taken_over(tmp_path, caplog):
    path = tmp_path / "sam" / f"{SPLIT}.h5"
    lock = path.with_name(path.name + ".lock")
    first = start_writer(path)
    try:
        assert json.loads(lock.read_text())["pid"] == first.pid
        with pytest.raises(CacheLockedError) as err:
            FeatureCacheWriter(path, ["img0", "img1", "img2"], FP, SPECS, 32, teacher_config={}, dataset="coco128",
                               split=SPLIT, batch_size=3)
        msg = str(err.value)
        assert f"process {first.pid}" in msg and str(lock) in msg and "delete" not in msg.lower()
        assert "remove" not in msg.lower() and f"kill {first.pid}" in msg and "another --output" in msg
        # the tool: one message, exit 2, the first writer's file untouched
        assert run_tool(ptf.main, tool(COCO, path.parent, "--limit", "2")) == 2
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(60) == 0
    finally:
        first.kill()
    assert not lock.exists()  # removed on exit

    killed = start_writer(path)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert lock.exists()  # a SIGKILL leaves the lock behind ...
    with caplog.at_level(logging.WARNING, logger="vfmkd"):  # ... and the next writer takes it over
        with FeatureCacheWriter(path, ["img0", "img1", "img2"], FP, SPECS, 32, teacher_config={}, dataset="coco128",
                                split=SPLIT, batch_size=3) as w:
            assert json.loads(lock.read_text())["pid"] == os.getpid() and len(w.missing()) == 3
    assert f"taking over the lock of process {killed.pid}" in caplog.text and not lock.exists()


# 5. label lines -----------------------------------------------------------------------------------------

def test_duplicate_label_lines_are_dropped_with_file_and_lines(tmp_path, caplog):
    root = new_root(tmp_path)
    shutil.copy(coco_image(0), root / "images" / SPLIT)
    label = root / "object_detection" / "labels" / SPLIT / f"{coco_image(0).stem}.txt"
    label.write_text("1 0.5 0.5 0.2 0.2\n2 0.3 0.3 0.1 0.1\n1 0.5 0.5 0.2 0.2\n\n1 0.50 0.5 0.2 0.20\n1 0.5 0.5 0.2 "
                     "0.3\n")
    with caplog.at_level(logging.WARNING, logger="vfmkd"):
        ds = DetectionDataset(str(root), SPLIT, img_size=64)
    assert np.allclose(ds.labels[0], [[1, 0.5, 0.5, 0.2, 0.2], [2, 0.3, 0.3, 0.1, 0.1], [1, 0.5, 0.5, 0.2, 0.3]])
    assert f"{label}: dropped 2 duplicate label line(s): line 3 (= line 1), line 5 (= line 1)" in caplog.text


@pytest.mark.parametrize("line, why", [("-1 0.5 0.5 0.1 0.1", "class id -1"), ("0 0.5 -0.1 0.1 0.1", "not normalised"),
                                       ("0 0.5 0.5 0.1 0.1 0.9", "5 values")])
def test_bad_label_lines_name_file_and_line(tmp_path, line, why):
    root = new_root(tmp_path)
    shutil.copy(coco_image(0), root / "images" / SPLIT)
    label = root / "object_detection" / "labels" / SPLIT / f"{coco_image(0).stem}.txt"
    label.write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(Exception, match=f"{label.name}:2") as err:
        DetectionDataset(str(root), SPLIT, img_size=64)
    assert why in str(err.value)


# 6. --splits a b key=value ------------------------------------------------------------------------

def test_splits_do_not_swallow_overrides():
    args = ptf.parse_args(["teacher.variant=vit_b", "--splits", "train2017", "val2017", "teacher.init=random",
                           "teacher.input_size=64", "--limit", "2"])
    assert args.splits == ["train2017", "val2017"] and args.limit == 2
    assert args.overrides == ["teacher.variant=vit_b", "teacher.init=random", "teacher.input_size=64"]
    assert ptf.parse_args(["--splits", "val2017"]).splits == ["val2017"]
    with pytest.raises(ConfigError, match="at least one split"):
        ptf.parse_args(["--splits", "teacher.init=random"])


# 7. truncated / foreign caches, bombs, YAML tags, unwritable outputs ----------------------------------

def test_truncated_and_foreign_cache_files_name_file_and_command(tmp_path):
    path = tmp_path / "sam" / f"{SPLIT}.h5"
    small_cache(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a copy cut short
    with pytest.raises(CacheMismatchError) as err:
        FeatureCacheReader(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg and f"--splits {SPLIT} --output {path.parent}" in msg
    with pytest.raises(CacheMismatchError, match="my rebuild command"):
        FeatureCacheReader(path, rebuild="my rebuild command")
    with pytest.raises(CacheMismatchError, match="truncated"):  # the writer refuses to resume it too
        FeatureCacheWriter(path, ["img0"], FP, SPECS, 32, teacher_config={}, dataset="coco128", split=SPLIT,
                           batch_size=1)

    foreign = tmp_path / "other" / f"{SPLIT}.h5"
    foreign.parent.mkdir()
    with h5py.File(foreign, "w") as f:
        f["weights"] = np.arange(4)
    before = foreign.read_bytes()
    with pytest.raises(CacheMismatchError) as err:
        FeatureCacheReader(foreign)
    assert str(foreign) in str(err.value) and "not a vfmkd feature cache" in str(err.value)
    assert "prepare_teacher_features.py" in str(err.value)
    with pytest.raises(CacheMismatchError, match="not a vfmkd feature cache.*left untouched"):
        FeatureCacheWriter(foreign, ["img0"], FP, SPECS, 32, teacher_config={}, dataset="coco128", split=SPLIT,
                           batch_size=1)
    assert foreign.read_bytes() == before and not foreign.with_name(foreign.name + ".lock").exists()


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_rejected_by_pillows_limit(tmp_path, monkeypatch):
    default = Image.MAX_IMAGE_PIXELS
    assert default and default == 89478485  # never lifted by vfmkd (importing it changed nothing)
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 100_000, 100_000)  # 10^10 pixels, 30 GB decoded; 100 bytes on disk
    ok, _, skipped = check_images([coco_image(0), bomb], SPLIT)
    assert ok == [coco_image(0)] and skipped[0][0] == str(bomb) and "DecompressionBombError" in skipped[0][1]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a real image above a lowered limit, in this test only
    _, _, skipped = check_images([coco_image(0)], SPLIT)
    assert "DecompressionBombError" in skipped[0][1]
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(coco_image(0))


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(cfg)
    assert str(cfg) in str(err.value) and "python/object" in str(err.value)
    assert not marker.exists()


def test_output_that_is_a_file_or_unwritable_exits_2(tmp_path, caplog):
    afile = tmp_path / "out_is_a_file"
    afile.write_text("x")
    with caplog.at_level(logging.ERROR, logger="vfmkd"):
        assert run_tool(ptf.main, tool(COCO, afile, "--limit", "2")) == 2
    assert f"{afile} is a file, not a folder" in caplog.text and afile.read_text() == "x"
    caplog.clear()
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "cache"
    else:  # root writes through permission bits: use a folder the kernel refuses even to root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys to test an unwritable folder as root")
        out = Path("/sys/vfmkd_cache_test")
    with caplog.at_level(logging.ERROR, logger="vfmkd"):
        assert run_tool(ptf.main, tool(COCO, out, "--limit", "2")) == 2
    assert f"cannot create the cache folder {out}" in caplog.text and "Traceback" not in caplog.text


def test_full_disk_mid_write_exits_2_and_the_rerun_resumes(tmp_path, monkeypatch, caplog):
    out = tmp_path / "cache"
    real = FeatureCacheWriter._write
    calls = []

    def failing(self, start, *args):
        calls.append(start)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, start, *args)

    monkeypatch.setattr(FeatureCacheWriter, "_write", failing)
    with caplog.at_level(logging.ERROR, logger="vfmkd"):
        assert run_tool(ptf.main, tool(COCO, out, "--limit", "4")) == 2
    assert "No space left on device" in caplog.text and "rerun the same command (it resumes)" in caplog.text
    assert not (out / f"{SPLIT}.h5.lock").exists()
    monkeypatch.setattr(FeatureCacheWriter, "_write", real)
    assert run_tool(ptf.main, tool(COCO, out, "--limit", "4")) == 0
    assert FeatureCacheReader(out / f"{SPLIT}.h5").done.all()


FSIZE = textwrap.dedent("""
    import resource, runpy, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))
    sys.argv = ["prepare_teacher_features.py"] + sys.argv[1:]
    runpy.run_path("tools/prepare_teacher_features.py", run_name="__main__")
""")


def test_no_room_for_the_cache_is_refused_before_hdf5_writes(tmp_path):
    """Before: h5py errors in dealloc, then a segfault (exit 139) and a broken file."""
    out = tmp_path / "cache"
    got = subprocess.run([sys.executable, "-c", FSIZE, *tool(COCO, out, "--limit", "4")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "YOLO_OFFLINE": "1"})
    assert got.returncode == 2, got.stderr[-2000:]
    assert "cannot allocate the" in got.stderr and "File too large" in got.stderr and "Traceback" not in got.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no partial cache, no lock, no scratch file
