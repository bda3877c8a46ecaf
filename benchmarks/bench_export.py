"""Export latency: the YOLOv8n student (backbone + neck + detection head, eval mode) exported by
vfmkd.engine.export.exporter to ONNX and run by ONNX Runtime (CPU execution provider) vs the same model in
PyTorch eager (``torch.no_grad``), batch 1, on CPU, both with the same thread count.

For each input size the two runtimes alternate call by call after ``--warmup`` calls each; the
figure is the median over ``--runs`` calls, printed side by side with the ratio PyTorch / ONNX
Runtime (> 1: ONNX Runtime is faster). The exported graph is checked against PyTorch first.

    python benchmarks/bench_export.py                 # 320 and 640, 30 runs each
    python benchmarks/bench_export.py --quick         # 10 runs
    python benchmarks/bench_export.py --sizes 640 --runs 50 --threads 2
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, machine, median, quiet

from vfmkd.core.config import load_experiment  # noqa: E402
from vfmkd.engine.builders import build_model  # noqa: E402
from vfmkd.engine.export.exporter import export_onnx  # noqa: E402
from vfmkd.engine.export.student_graph import ExportedStudent, example_input  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="10 runs, 3 warm-up calls")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup = 10, 3
    quiet()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    cfg = load_experiment(EXPERIMENT)
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    eager = ExportedStudent(model)
    print(f"machine: {machine()}; onnxruntime {ort.__version__}, {args.threads} threads each; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"YOLOv8n student ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), batch 1, "
          f"median of {args.runs} calls after {args.warmup} warm-up calls")
    print(f"{'size':>5} {'PyTorch ms':>11} {'ONNX RT ms':>11} {'PyTorch/ORT':>12} {'max |diff|':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"yolov8n_{size}.onnx"
            diff = export_onnx(model, path, size)["max_scaled"]  # checked against PyTorch before it is written
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            x = example_input(size)
            feed = {"images": x.numpy()}
            times = {"torch": [], "ort": []}
            with torch.no_grad():
                for i in range(args.warmup + args.runs):
                    for name in ("torch", "ort") if i % 2 == 0 else ("ort", "torch"):
                        t = time.perf_counter()
                        eager(x) if name == "torch" else session.run(None, feed)
                        if i >= args.warmup:
                            times[name].append((time.perf_counter() - t) * 1000)
            pt, rt = median(times["torch"]), median(times["ort"])
            print(f"{size:>5} {pt:>11.1f} {rt:>11.1f} {pt / rt:>12.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
