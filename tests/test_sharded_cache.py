"""Sharded feature caching under torchrun (2 gloo ranks on CPU): the joined cache equals the
single-process cache bit for bit, and a rank killed mid-shard resumes on the rerun to the same file."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vfmkd.cache.shards import shard_file, shard_range

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

SPLIT, LIMIT, BATCH = "train2017", 8, 2
pytestmark = pytest.mark.slow


def tool_args(output: Path) -> list[str]:
    return ["--teacher", "sam", "--splits", SPLIT, "--limit", str(LIMIT), "--batch-size", str(BATCH),
            "--output", str(output), "--no-progress", "teacher.init=random", "teacher.input_size=64"]


def torchrun(script: Path, output: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    # one thread per rank; the single-process reference runs with one thread too (same fp16 bits)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *tool_args(output)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_cache(got_path: Path, want_path: Path) -> None:
    """Every dataset (dtype, chunks, values) and every attribute equal: as the resume test compares."""
    with h5py.File(got_path, "r") as got, h5py.File(want_path, "r") as want:
        names, got_names = [], []
        want.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        got.visititems(lambda n, o: got_names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(got_names) == sorted(names) and len(names) == 9
        for n in names:
            assert got[n].dtype == want[n].dtype and got[n].chunks == want[n].chunks, n
            assert np.array_equal(got[n][:], want[n][:]), n
        assert dict(got.attrs) == dict(want.attrs)  # no attribute differs (compute: "cpu torch_threads=1" in both)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    try:
        assert ptf.main(tool_args(out)) == 0
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    return out / f"{SPLIT}.h5"


def test_shard_ranges_cover_whole_batches():
    for n in (1, 7, 8, 9, 31):
        for b in (1, 2, 4):
            for w in (1, 2, 3, 5):
                ranges = [shard_range(n, b, r, w) for r in range(w)]
                assert ranges[0][0] == 0 and ranges[-1][1] == n
                assert all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))
                assert all(s % b == 0 for s, _ in ranges)


def test_two_rank_sharded_cache_equals_single_process(single, tmp_path):
    out = tmp_path / "sharded"
    proc = torchrun(REPO / "tools" / "prepare_teacher_features.py", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{LIMIT} images written, 0 already cached" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{SPLIT}.h5"]  # shards, locks and the temp file are gone
    assert_same_cache(out / f"{SPLIT}.h5", single)


def test_rank_killed_mid_shard_resumes_and_equals(single, tmp_path):
    """Rank 1 is SIGKILLed while computing its 2nd batch (its 1st is written); torchrun stops the job.
    The same command again resumes each shard and joins them into the single-process file."""
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
        proc = torchrun(driver, out)
    finally:
        del os.environ["NO_KILL"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the lock" in proc.stderr
    written = int(proc.stdout.split(" images written")[0].rsplit(" ", 1)[-1])
    assert BATCH <= written <= LIMIT - BATCH  # rank 1's first batch was not recomputed
    assert sorted(p.name for p in out.iterdir()) == [f"{SPLIT}.h5"]
    assert_same_cache(out / f"{SPLIT}.h5", single)
