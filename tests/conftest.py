"""Shared fixtures: the shipped coco128 copy and a quiet ultralytics."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO / "datasets" / "coco128"


def pytest_collection_modifyitems(config, items):
    # Longest first: files with end-to-end (`slow`) or subprocess-comparing (`bitexact`) tests are handed to
    # the xdist workers before the quick ones (`--dist loadfile` schedules files in this order), so the suite
    # does not end with one worker running a long file while the other is idle.
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("bitexact")}
    items.sort(key=lambda item: item.path not in heavy)  # stable: each file keeps its own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def coco128() -> Path:
    assert (COCO128 / "images" / "train2017").is_dir(), "datasets/coco128 is missing from the checkout"
    return COCO128


# Under pytest-xdist (the README's command: one worker per core) each worker computes on one thread so
# the workers do not fight over the cores. Tests marked `bitexact` compare this process's numbers with a
# subprocess's (a killed tool, torchrun ranks) bit for bit: they keep the default two threads, which is
# what those subprocesses use, since float sums depend on the thread count. Set in a setup hook, not a
# fixture: session- and module-scoped fixtures (a reference teacher's features) are built before any
# function-scoped fixture runs, and must be computed at the thread count of the test that builds them.
def _thread_count(bitexact: bool) -> int:
    if os.environ.get("PYTEST_XDIST_WORKER") and not bitexact:
        return 1
    return min(2, os.cpu_count() or 1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    torch.set_num_threads(_thread_count(item.get_closest_marker("bitexact") is not None))
