"""benchmarks/gpu_suite.sh --dry-run: every step of the GPU suite runs on the CPU at tiny sizes and the report
JSON holds each step's result, so the suite cannot rot before a GPU is at hand."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # an end-to-end run of the tools: scheduled first (conftest)

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_dry_run_runs_every_step_and_writes_its_report(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = report["steps"]
    assert report["dry_run"] and set(steps) == {"pytest_gpu", "sam_extraction", "sam2_extraction",
                                                "train_step_yolov8s", "prefetch_teacher"}
    assert steps["pytest_gpu"]["result"]["skipped"] >= 1  # no GPU here: the gpu tests are collected and skipped
    assert set(steps["sam_extraction"]["result"]["runs"]) == {"stock/float32", "fast/float32"}
    assert steps["train_step_yolov8s"]["result"]["rows"][0]["student_only_over_offline_distill"] > 0
    prefetch = steps["prefetch_teacher"]["result"]
    assert prefetch["online_prefetch_over_serial"] > 0 and prefetch["mixed_prefetch_over_ideal_serial_mix"] > 0
    section = (tmp_path / "gpu_suite.md").read_text()
    assert "Dry run" in section and "| prefetch_teacher | ok |" in section
