"""The query panoptic head (rapsam_head), its task (panoptic_query), loss, SAM output pairing and export,
on real coco128 images at 128 px (the task contract itself: tests/test_task_contract.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vfmkd.distillation.losses  # noqa: F401  (registers the losses)
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.registry import HEADS
from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.pairing.output_rules import TeacherOutputs
from vfmkd.distillation.query_matching import hungarian_match
from vfmkd.distillation.targets import MaskLogits, TeacherTargets
from vfmkd.engine.builders import build_loss_terms, output_class_channels
from vfmkd.engine.evaluation.evaluator import build_scorers, evaluate
from vfmkd.models.unified_model import StudentOutput, UnifiedModel
from vfmkd.tasks import QueryPanopticOutput, get_task, task_of
from vfmkd.utils.cli import run_tool

SIZE, SPLIT, QUERIES = 128, "train2017", 12
HEAD = {"type": "rapsam_head", "num_queries": QUERIES, "channels": 32, "num_heads": 2, "ffn_dim": 64,
        "score_threshold": 0.0}  # untrained: keep every query, so PQ counts segments


def tiny_model(num_classes: int) -> UnifiedModel:
    torch.manual_seed(0)
    return UnifiedModel.from_config({"backbone": {"type": "yolov8", "variant": "n"},
                                     "neck": {"type": "yolov8_pafpn", "depth": 1},
                                     "heads": {"panoptic": {**HEAD, "num_classes": num_classes}}})


class PooledStudent(torch.nn.Module):
    """A stand-in backbone + neck (the image average-pooled to strides 8/16/32 and projected) under the real
    head: the loss, pairing and scorer see a real head on real images at a fraction of a backbone's cost."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        specs = [FeatureSpec(f"P{k}", 16, 2 ** k) for k in (3, 4, 5)]
        self.proj = torch.nn.ModuleList(torch.nn.Conv2d(3, 16, 1) for _ in specs)
        self.specs = specs
        self.heads = torch.nn.ModuleDict({"panoptic": HEADS.build("rapsam_head", in_specs=specs, **{
            k: v for k, v in HEAD.items() if k != "type"}, num_classes=num_classes)})

    def forward(self, images: torch.Tensor) -> StudentOutput:
        neck = {s.name: p(F.avg_pool2d(images, s.stride)) for s, p in zip(self.specs, self.proj)}
        return StudentOutput({}, neck, {"panoptic": self.heads["panoptic"](neck)})


@pytest.fixture(scope="module")
def setup(coco128):
    ds = DetectionDataset(str(coco128), SPLIT, img_size=SIZE, limit=2, instances=True, semantic=True)
    batch = collate_samples([ds[0], ds[1]])
    return ds, batch, PooledStudent(ds.semantic_num_classes), output_class_channels(str(coco128))


def test_head_shapes_and_typed_output(setup):
    ds, batch, model, _ = setup
    out = get_task("panoptic_query").read_output(model(batch.images).heads["panoptic"])
    assert isinstance(out, QueryPanopticOutput) and task_of(model.heads["panoptic"]).name == "panoptic_query"
    assert out.class_logits.shape == (2, QUERIES, ds.semantic_num_classes + 1)  # + no-object
    assert out.mask_logits.shape == (2, QUERIES, SIZE // 8, SIZE // 8) and out.iou.shape == (2, QUERIES)
    assert bool(((out.iou >= 0) & (out.iou <= 1)).all())
    assert model.heads["panoptic"].fusion_weights()["merge"]  # the learnable multi-scale merge, logged per epoch


def test_matcher_on_a_hand_built_case():
    big = 8.0
    targets = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])  # target 0: class 1, target 1: class 0
    masks = torch.tensor([[-big, -big, big, big], [0.0, 0, 0, 0], [big, big, -big, -big]])
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 5], [0, 5, 0]])  # query 1 says "no object"
    q, t = hungarian_match(logits, masks, torch.tensor([1, 0]), targets)
    assert sorted(zip(q.tolist(), t.tolist())) == [(0, 1), (2, 0)]
    q, t = hungarian_match(logits, masks, torch.zeros(0, dtype=torch.long), targets[:0])
    assert len(q) == len(t) == 0


def sam_targets(batch) -> TeacherTargets:
    """Live-pass SAM stand-in: a box-shaped mask logit map (S/4) per detection box."""
    boxes, n = batch.boxes, len(batch)
    grid = SIZE // 4
    xy = (torch.arange(grid) + 0.5) / grid
    b = boxes.bboxes
    inside_x = (xy[None] > (b[:, 0] - b[:, 2] / 2)[:, None]) & (xy[None] < (b[:, 0] + b[:, 2] / 2)[:, None])
    inside_y = (xy[None] > (b[:, 1] - b[:, 3] / 2)[:, None]) & (xy[None] < (b[:, 1] + b[:, 3] / 2)[:, None])
    logits = torch.where(inside_y[:, :, None] & inside_x[:, None, :], 6.0, -6.0)
    masks = MaskLogits(logits, boxes.batch_idx.long(), boxes.label_index.long(), boxes.cls.view(-1).long())
    ident = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n)
    return TeacherTargets({}, ident, torch.full((n, 2), float(SIZE)), SIZE, student_affine=ident, mask_logits=masks)


def test_two_training_steps_log_the_four_losses_distil_sam_and_report_pq(setup, coco128):
    ds, batch, model, tables = setup
    losses = {"query_panoptic": {"type": "query_panoptic", "num_points": 128},
              "sam_masks": {"type": "mask_distill", "teacher": "sam", "log_as": "loss_query_mask_distill"},
              "sam_classes": {"type": "kl_divergence", "teacher": "sam", "log_as": "loss_query_cls_distill"}}
    terms = build_loss_terms(losses, model, {}, {}, teachers={"sam": TeacherOutputs("sam", "sam", can_segment=True)},
                             class_channels=tables)
    by_name = {t.name: t for t in terms}
    assert by_name["sam_classes"].module.temperature == 4.0  # the seed's temperature, the loss's default
    distiller = Distiller(terms)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        result = distiller(model(batch.images), batch, {"sam": sam_targets(batch)})
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()
        for name in ("loss_cls", "loss_mask", "loss_dice", "loss_iou", "loss_query_mask_distill",
                     "loss_query_cls_distill"):
            assert math.isfinite(result.logs[name]) and result.logs[name] > 0, name
    names = dict(enumerate(ds.semantic_table.names))
    scorers = build_scorers({"panoptic": "panoptic_query"}, {}, names, data_root=str(coco128), split=SPLIT)
    scores = evaluate(model, [batch], scorers, torch.device("cpu"), progress=False)["panoptic"]
    assert scores["images"] == 2 and all(math.isfinite(scores[k]) for k in ("PQ", "PQ_things", "mIoU"))
    assert "PQ_stuff" in scores


def test_per_entry_temperature_and_refusals(setup):
    _, _, model, tables = setup
    sam = {"sam": TeacherOutputs("sam", "sam", can_segment=True)}
    (term,) = build_loss_terms({"kd": {"type": "kl_divergence", "teacher": "sam", "temperature": 2.0}}, model, {}, {},
                               teachers=sam, class_channels=tables)
    assert term.module.temperature == 2.0 and term.head == "panoptic"
    with pytest.raises(ConfigError, match="stuff has no masks in these labels"):  # no semantic class table
        build_loss_terms({"q": {"type": "query_panoptic"}}, model, {}, {}, class_channels={})


def test_onnx_export_runs_under_onnxruntime_and_matches_torch(setup, tmp_path):
    from vfmkd.engine.export.check import onnx_session
    from vfmkd.engine.export.exporter import export_onnx
    from vfmkd.engine.export.student_graph import export_outputs

    _, batch, _, _ = setup
    model = tiny_model(130).eval()
    assert [(o.name, o.part) for o in export_outputs(model)] == [
        ("output0", "class_logits"), ("output1", "mask_logits"), ("output2", "iou")]
    path = tmp_path / "rapsam.onnx"
    diff = export_onnx(model, path, 64)  # checked under ONNX Runtime against torch before the rename
    assert diff["max_scaled"] < 1e-4
    got = onnx_session(path).run(None, {"images": batch.images[:1, :, :64, :64].numpy()})
    assert [g.shape for g in got] == [(1, QUERIES, model.heads["panoptic"].num_classes + 1), (1, QUERIES, 8, 8),
                                      (1, QUERIES)]


def test_bad_inputs_exit_2(tmp_path, caplog, coco128):
    from vfmkd.engine.commands import train as train_tool

    config = tmp_path / "q.yaml"
    config.write_text(f"experiment_name: q\nwork_dir: {tmp_path / 'runs'}\nmodel:\n"
                      "  backbone: {type: yolov8, variant: n}\n  neck: {type: yolov8_pafpn, depth: 1}\n"
                      "  heads: {panoptic: {type: rapsam_head, num_classes: 130, num_queries: 0}}\n"
                      f"data: {{root: {coco128}, img_size: 64, limit: 2, num_workers: 0}}\n")
    assert run_tool(train_tool.main, [str(config), "--no-progress"]) == 2
    assert "num_queries must be >= 1" in caplog.text


def test_ablation_reports_the_query_heads_pq_parts():
    from vfmkd.engine.training.ablation import markdown_table, summary_row

    scores = {"PQ": 0.25, "PQ_things": 0.3, "PQ_stuff": 0.2, "mIoU": 0.4}
    result = {"metrics": {"epochs": [{"val": {"query": scores}}]}, "seconds": 1.0, "peak_rss_mib": 10.0,
              "peak_gpu_mib": None, "run_dir": "r"}
    row = summary_row("full", result)
    assert (row["PQ"], row["PQ_th"], row["PQ_st"], row["mIoU"]) == (0.25, 0.3, 0.2, 0.4)
    table = markdown_table([row], "t")
    assert "| PQ | PQ_th | PQ_st | mIoU |" in table and "| 0.2500 | 0.3000 | 0.2000 | 0.4000 |" in table
