#!/usr/bin/env python
"""Assemble benchmarks/gpu_suite.sh's steps into OUT/gpu_suite.json and a BENCHMARKS.md section (OUT/gpu_suite.md).

    python benchmarks/gpu_suite_report.py --out work_dirs/gpu_suite [--dry-run] [--write-benchmarks BENCHMARKS.md]

Reads OUT/steps.tsv (name, exit status, milliseconds per step) and each step's log (OUT/logs/NAME.log:
the ``RESULT {json}`` line the benchmark printed; pytest's summary line). ``--write-benchmarks`` replaces
the text between the ``gpu_suite`` markers of that file with the section (never on a dry run: its tiny
CPU numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from vfmkd.utils.atomic_files import write_text  # noqa: E402

BEGIN, END = "<!-- gpu_suite:begin -->", "<!-- gpu_suite:end -->"
STEPS = ("pytest_gpu", "sam_extraction", "sam2_extraction", "train_step_yolov8s", "prefetch_teacher")


def read_steps(out: Path) -> Dict[str, Dict[str, Any]]:
    steps: Dict[str, Dict[str, Any]] = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, ms = line.split("\t")
        log = out / "logs" / f"{name}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        result = next((json.loads(x[7:]) for x in reversed(text.splitlines()) if x.startswith("RESULT ")), None)
        if name == "pytest_gpu":
            summary = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)
            result = {kind: int(n) for n, kind in summary} or None
        steps[name] = {"rc": int(rc), "seconds": int(ms) / 1000.0, "result": result, "log": str(log)}
    return steps


def fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def section(report: Dict[str, Any]) -> str:
    steps, rows = report["steps"], []
    head = ("### GPU suite (`bash benchmarks/gpu_suite.sh`, issue 21)\n\n"
            f"{'Dry run on the CPU at tiny sizes (numbers meaningless)' if report['dry_run'] else 'Device'}: "
            f"{report['device']}; {report['total_seconds']:.0f} s in all.\n")
    for name in STEPS:
        s = steps.get(name)
        if s is None:
            rows.append(f"| {name} | not run | | |")
            continue
        status = "ok" if s["rc"] == 0 else ("timed out" if s["rc"] == 124 else f"failed (rc {s['rc']})")
        rows.append(f"| {name} | {status} | {s['seconds']:.0f} s | {summary(name, s['result'])} |")
    return head + "\n| step | status | time | result |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def summary(name: str, result: Any) -> str:
    if not result:
        return "no result"
    if name == "pytest_gpu":
        return ", ".join(f"{n} {k}" for k, n in result.items())
    if name in ("sam_extraction", "sam2_extraction"):
        runs = [f"{k} {fmt(r['images_per_s'], '.1f')} img/s (peak {fmt(r['peak_gpu_mib'], '.0f')} MiB)"
                for k, r in result["runs"].items()]
        ratios = [f"fast ÷ stock {k.split('/')[1]} **{v:.2f}**" for k, v in result.items() if k.startswith("fast_over")]
        return f"@{result['size']}, batch {result['batch']}: " + "; ".join(runs + ratios)
    if name == "train_step_yolov8s":
        rows = [f"@{r['img_size']}: student-only ÷ offline-distill **{r['student_only_over_offline_distill']:.3f}**"
                for r in result["rows"]]
        return "; ".join(rows) + f" (peak {fmt(result['peak_gpu_mib'], '.0f')} MiB)"
    thr = result["images_per_s"]
    return ("img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in thr.items())
            + f"; online prefetch ÷ serial **{result['online_prefetch_over_serial']:.2f}**, mixed prefetch ÷ ideal "
            f"serial mix **{result['mixed_prefetch_over_ideal_serial_mix']:.2f}** (peak "
            f"{fmt(result['peak_gpu_mib'], '.0f')} MiB)")


def replace_section(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers: add them where the section belongs")
    head, rest = doc.split(BEGIN, 1)
    write_text(path, head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--write-benchmarks", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    steps = read_steps(a.out)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.dry_run else "CPU"
    report = {"dry_run": a.dry_run, "device": device, "torch": torch.__version__, "steps": steps,
              "total_seconds": sum(s["seconds"] for s in steps.values()),
              "ok": all(s["rc"] == 0 and s["result"] for s in steps.values()) and set(STEPS) <= set(steps)}
    text = section(report)
    write_text(a.out / "gpu_suite.json", json.dumps(report, indent=2) + "\n")
    write_text(a.out / "gpu_suite.md", text)
    if a.write_benchmarks is not None and not a.dry_run:
        replace_section(a.write_benchmarks, text)
    print(text)
    print(f"{'all steps ok' if report['ok'] else 'SOME STEPS FAILED'}: {a.out / 'gpu_suite.json'}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
