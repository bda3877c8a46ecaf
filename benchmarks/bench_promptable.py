"""Issue 12: the promptable student's image encoder against SAM ViT-B's, and what decoder distillation costs.

Rows (random init; the numbers are sizes and speeds, not accuracy):
* student encoders = backbone + yolov8_pafpn neck + the sam_decoder head's adapter (images ->
  (B, 256, S/16, S/16) embeddings; exactly what ``tools/export.py`` puts in ``*.encoder.onnx``),
  for RepViT-M0.9 and YOLOv8-s; SAM ViT-B's ``image_encoder`` (segment_anything);
  - params (M) of the encoder (the prompt encoder and mask decoder, shared by all, are listed apart);
  - GFLOPs of one forward at ``--size`` (1024) x same, batch 1, ``torch.utils.flop_counter.FlopCounterMode``
    (2 FLOPs per multiply-add; matmuls, convolutions, attention);
  - CPU images/s at batch 1 and ``--size`` in eval / no_grad: the best of ``--iters`` timed forwards
    after one warm-up (the best, not the median: other processes only ever slow an iteration down).
* decoder-distill step / encoder-only step, YOLOv8-s student, batch ``--batch`` at ``--step-size``:
  encoder-only = forward + pixel-wise MSE on the embeddings + backward (EdgeSAM phase 1); decoder
  distillation adds, per image, ``--boxes`` box prompts, as many one-point prompts and one refinement
  pass (the box masks fed back as mask input plus one error-region point), each BCE + Dice against
  fixed target logits (EdgeSAM phase 2, ``prompt_distill`` with points: 1, refine_iters: 1). The
  loss maths are written out here so the ratio measures the decoder's work, not the data path.

    python benchmarks/bench_promptable.py            # 3 timed iterations
    python benchmarks/bench_promptable.py --quick    # 1 timed iteration, SAM timed once
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from _common import REPO, machine, median, quiet
from torch.utils.flop_counter import FlopCounterMode

from vfmkd.core.config import experiment_from_dict  # noqa: E402
from vfmkd.engine.builders import build_model  # noqa: E402

STUDENTS = {"repvit_m0_9": {"type": "repvit", "config": "configs/backbones/repvit_m0_9.yaml"},
            "yolov8s": {"type": "yolov8", "config": "configs/backbones/yolov8s.yaml"}}


class StudentEncoder(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.heads["promptable"](self.model.neck(self.model.backbone(x)))


def student(backbone: Dict[str, str]):
    cfg = {"backbone": dict(backbone), "neck": {"type": "yolov8_pafpn", "depth": 1},
           "heads": {"promptable": {"type": "sam_decoder", "in_level": "P4"}}}
    exp = experiment_from_dict({"experiment_name": "bench_promptable", "model": cfg,
                                "data": {"dataset": "coco128", "root": str(REPO / "datasets/coco128")}})
    return build_model(exp["model"])


def encoder_params(model) -> int:
    head = model.heads["promptable"]
    shared = {id(p) for m in (head.prompt_encoder, head.mask_decoder) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in shared)


def gflops(module: torch.nn.Module, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def images_per_s(module: torch.nn.Module, size: int, iters: int) -> float:
    x = torch.rand(1, 3, size, size)
    times: List[float] = []
    with torch.no_grad():
        for i in range(iters + 1):
            t0 = time.perf_counter()
            module(x)
            if i:
                times.append(time.perf_counter() - t0)
    return 1.0 / min(times)


def bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(1)
    t = (target > 0).float().flatten(1)
    dice = 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return 5.0 * F.binary_cross_entropy_with_logits(logits, (target > 0).float()) + 5.0 * dice.mean()


def step_times(batch: int, size: int, boxes: int, iters: int) -> Tuple[float, float]:
    torch.manual_seed(0)
    model = student(STUDENTS["yolov8s"]).train()
    head = model.heads["promptable"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    h = size // 16
    images = torch.rand(batch, 3, size, size)
    target_emb = torch.randn(batch, 256, h, h)
    n = batch * boxes
    idx = torch.arange(batch).repeat_interleave(boxes)
    xy = torch.rand(n, 2) * size * 0.5
    box = torch.cat([xy, xy + size * 0.25 + torch.rand(n, 2) * size * 0.25], 1)
    points = (box[:, :2] + box[:, 2:]).div(2).unsqueeze(1)
    target_masks = torch.randn(n, 1, 4 * h, 4 * h)

    def one(decoder: bool) -> float:
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        emb = head(model.neck(model.backbone(images)))
        loss = F.mse_loss(emb, target_emb)
        if decoder:
            low_box, _ = head.decode(emb, idx, boxes=box)
            low_pt, _ = head.decode(emb, idx, points=points)
            refine_pt = points + 3.0  # one point from the error region (its sampling is cheap next to the decoder)
            low_ref, _ = head.decode(emb, idx, boxes=box, points=refine_pt, mask_input=low_box.detach())
            loss = loss + sum(bce_dice(m, target_masks) for m in (low_box, low_pt, low_ref))
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    one(False), one(True)  # warm-up
    enc = [one(False) for _ in range(iters)]
    dec = [one(True) for _ in range(iters)]
    return median(enc), median(dec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--step-size", type=int, default=512)
    parser.add_argument("--boxes", type=int, default=8)
    args = parser.parse_args()
    quiet()
    iters = 1 if args.quick else args.iters
    print(machine())
    print(f"| encoder | params (M) | GFLOPs @{args.size} | CPU images/s @{args.size}, batch 1 |")
    print("|---|---|---|---|")
    shared = None
    for name, backbone in STUDENTS.items():
        torch.manual_seed(0)
        model = student(backbone).eval()
        head = model.heads["promptable"]
        shared = sum(p.numel() for m in (head.prompt_encoder, head.mask_decoder) for p in m.parameters())
        enc = StudentEncoder(model).eval()
        print(f"| {name} + yolov8_pafpn + sam_decoder adapter | {encoder_params(model) / 1e6:.2f} | "
              f"{gflops(enc, args.size):.1f} | {images_per_s(enc, args.size, iters):.2f} |", flush=True)
    from segment_anything import sam_model_registry

    sam = sam_model_registry["vit_b"](checkpoint=None).image_encoder.eval()
    print(f"| SAM ViT-B image encoder | {sum(p.numel() for p in sam.parameters()) / 1e6:.2f} | "
          f"{gflops(sam, 1024):.1f} | {images_per_s(sam, 1024, 1):.3f} |", flush=True)
    print(f"(prompt encoder + mask decoder, the same for every row: {shared / 1e6:.2f} M params)")
    enc_t, dec_t = step_times(args.batch, args.step_size, args.boxes, iters)
    print(f"train step, yolov8s student, batch {args.batch} @{args.step_size}, {args.boxes} boxes/image: "
          f"encoder-only {enc_t:.2f} s, + decoder distillation {dec_t:.2f} s, ratio {dec_t / enc_t:.2f}")


if __name__ == "__main__":
    main()
