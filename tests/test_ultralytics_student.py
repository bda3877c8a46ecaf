"""An ultralytics model as the student (vfmkd/models/ultralytics_student.py): YOLO26n built by ultralytics from
its own yolo26n.yaml distils a live DINOv3 teacher on real coco128 images, trains with YOLO26's own end-to-end
criterion, validates with vfmkd's detection scorer, and exports through ultralytics' exporter and vfmkd's."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vfmkd.core.config import experiment_from_dict, load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.datasets.records import InstanceBatch
from vfmkd.distillation.losses.ultralytics_loss import UltralyticsTaskLoss
from vfmkd.engine.builders.losses import build_loss_terms
from vfmkd.engine.builders.model import build_model
from vfmkd.engine.export.exporter import export_onnx
from vfmkd.engine.export.ultralytics_layout import export_through_ultralytics, to_ultralytics
from vfmkd.engine.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "configs" / "experiments" / "yolo26n_dinov3_coco128.yaml"
SIZE = 128
SEG_SIZE = 96


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs (one step each) on two coco128 images at 128 px with a random DINOv3 ViT-S/16 at 64 px,
    validated after the second."""
    work = tmp_path_factory.mktemp("yolo26n")
    cfg = load_experiment(EXPERIMENT, [
        "teachers.dinov3.init=random", "teachers.dinov3.input_size=64", "data.limit=2", f"data.img_size={SIZE}",
        "data.batch_size=2", "data.num_workers=0", "train.epochs=2", "train.eval_interval=2", "eval.batch_size=2",
        f"work_dir={work}"])
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    return SimpleNamespace(trainer=trainer, metrics=metrics, model=trainer.model.eval(), cfg=cfg)


def test_yolo26_distils_with_its_own_end_to_end_loss_and_validates(run):
    logs = run.metrics["epochs"][0]["train"]
    for key in ("loss_det", "loss_feat_distill_dinov3_cls"):
        assert np.isfinite(logs[key]), key
    assert run.metrics["best_val"] is not None
    model = run.model
    assert [(s.name, s.channels, s.stride) for s in model.backbone.feature_specs()] == [
        ("P3", 64, 8), ("P4", 128, 16), ("P5", 256, 32)]
    head = model.heads["detection"]
    assert head.end2end and type(UltralyticsTaskLoss(head)._loss).__name__ == "E2ELoss"
    # the trainer stepped YOLO26's gain schedule per epoch: epoch 2 of 2 trains at ultralytics' final gains
    criterion = run.trainer.distiller.terms["detection"].module._loss
    assert (criterion.o2m, criterion.o2o) == pytest.approx((0.1, 0.9))  # 0.8 / 0.2 without the per-epoch hook


def test_the_student_is_ultralytics_own_network(run):
    """The distilled maps are the Detect head's inputs, and student == ultralytics' model put back together."""
    model = run.model
    um = model.backbone.assemble(model.heads["detection"])
    seen = {}
    um.model[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ours = model(x)
        theirs = um(x)
    for mine, detect_input in zip(ours.backbone.values(), seen["x"]):
        assert torch.equal(mine, detect_input)
    assert torch.equal(ours.heads["detection"][0], theirs[0])  # (B, 4 + 80, A) decoded, one-to-many branch


def test_exports_through_ultralytics_and_through_vfmkd(run, tmp_path):
    import onnxruntime as ort

    model, x = run.model, torch.rand(1, 3, SIZE, SIZE)
    path = export_through_ultralytics(model, run.cfg, {0: "person"}, tmp_path / "student.ultralytics.onnx", SIZE)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).heads["detection"][0].numpy()
    assert got.shape == want.shape == (1, 84, (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2)
    assert np.abs(got - want).max() < 1e-2 * SIZE  # boxes in pixels, scores in [0, 1]
    diff = export_onnx(model, tmp_path / "student.onnx", SIZE)  # vfmkd's own graph, checked by ONNX Runtime
    assert diff["max_scaled"] < 1e-3


def test_a_saved_ultralytics_checkpoint_starts_a_student_without_unpickling_code(run, tmp_path):
    """A .pt in ultralytics' layout ({'model': DetectionModel}) loads through the weights_only allow-list."""
    um = to_ultralytics(run.model, run.cfg, {})
    torch.save({"model": um, "train_args": {}}, tmp_path / "yolo26n_run.pt")
    student = build_model({"backbone": {"type": "ultralytics", "model": str(tmp_path / "yolo26n_run.pt")},
                           "heads": {"detection": {"type": "ultralytics_detect", "num_classes": 80}}})
    mine = student.state_dict()
    for key, value in run.model.state_dict().items():
        assert torch.equal(mine[key], value), key


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """ultralytics_segment end to end: yolo26n-seg (Segment26: end-to-end, (proto, semseg) outputs) with no teacher
    and no loss entry (its own criterion is implied), one step on two coco128 images with instance masks at
    SEG_SIZE px, validated."""
    work = tmp_path_factory.mktemp("yolo26n_seg")
    cfg = experiment_from_dict({
        "experiment_name": "yolo26n_seg", "work_dir": str(work), "teachers": {}, "distillation": {"losses": {}},
        "model": {"backbone": {"type": "ultralytics", "model": "yolo26n-seg.yaml"},
                  "heads": {"instances": {"type": "ultralytics_segment", "num_classes": 80}}},
        "data": {"dataset": "coco128", "img_size": SEG_SIZE, "limit": 2, "batch_size": 2, "num_workers": 0},
        "train": {"epochs": 1, "vis_interval": 0}, "eval": {"batch_size": 2}})
    trainer = Trainer(cfg, progress=False)
    return SimpleNamespace(trainer=trainer, metrics=trainer.fit(), run_dir=trainer.run_dir)


@pytest.fixture()
def seg_student(seg_run):
    """The trained yolo26n-seg student, in train mode with its batch norms' running statistics restored after."""
    model = seg_run.trainer.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield model.train()
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)


def test_yolo26_seg_trains_on_coco128_masks_validates_masks_and_exports_through_ultralytics(seg_run, tmp_path):
    import onnxruntime as ort

    from vfmkd.engine.commands import export

    record = seg_run.metrics["epochs"][0]
    loss = seg_run.trainer.distiller.terms["instances"].module  # implied: no entry in the config
    assert type(loss._loss).__name__ == "E2ELoss" and type(loss._loss.one2many).__name__ == "SegmentLoss26"
    assert np.isfinite(record["train"]["loss_instances"]) and record["train"]["loss_instances_seg"] > 0
    assert {"mask_mAP50", "mask_mAP50-95", "mAP50-95"} <= set(record["val"]["instances"])
    best = seg_run.run_dir / "checkpoints" / "best.pt"
    assert export.main(["--checkpoint", str(best), "--format", "ultralytics_onnx", "--output", str(tmp_path)]) == 0
    session = ort.InferenceSession(str(tmp_path / "best.ultralytics.onnx"))
    x = torch.rand(1, 3, SEG_SIZE, SEG_SIZE)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model = seg_run.trainer.model.eval()
    with torch.no_grad():
        want, proto = model(x).heads["instances"][0]  # (predictions, prototypes), the one-to-many branch
    cells = sum((SEG_SIZE // s) ** 2 for s in (8, 16, 32))
    assert got[0].shape == tuple(want.shape) == (1, 4 + 80 + 32, cells)  # boxes, scores, mask coefficients
    assert np.abs(got[0] - want.numpy()).max() < 1e-2 * SEG_SIZE
    assert np.abs(got[1] - proto.numpy()).max() < 1e-2


def _instances(labelled, rows=(0, 1)):
    """Two instances (one per image in ``rows``) at SEG_SIZE px, masks at SEG_SIZE / 4."""
    masks = torch.zeros(2, SEG_SIZE // 4, SEG_SIZE // 4)
    masks[0, 4:12, 4:12] = masks[1, 10:20, 8:16] = 1
    boxes = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.4, 0.45, 0.25, 0.3]])[:len(rows)]
    return InstanceBatch(cls=torch.tensor([[0.0], [2.0]])[:len(rows)], bboxes=boxes,
                         batch_idx=torch.tensor(rows, dtype=torch.float32), masks=masks[:len(rows)],
                         label_index=torch.full((len(rows),), -1), labelled=torch.tensor(labelled))


def test_unlabelled_images_give_the_ultralytics_loss_nothing(seg_student):
    """An image without labels is unknown, not empty: the loss of [labelled, unlabelled] is the loss of the
    labelled image alone (batch norm frozen so each image's output does not depend on the other)."""
    student = seg_student.train()
    student.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    loss = UltralyticsTaskLoss(student.heads["instances"])
    images = torch.rand(2, 3, SEG_SIZE, SEG_SIZE)
    with torch.no_grad():
        both, first = student(images).heads["instances"], student(images[:1]).heads["instances"]
    one = SimpleNamespace(images=images[:1], instances=_instances([True], rows=(0,)))
    mixed = SimpleNamespace(images=images, instances=_instances([True, False], rows=(0,)))
    as_background = SimpleNamespace(images=images, instances=_instances([True, True], rows=(0,)))
    alone = loss(first, one)[0]
    assert abs(float(loss(both, mixed)[0] - alone)) < 1e-5 * float(alone)
    assert abs(float(loss(both, as_background)[0] - alone)) > 1e-3 * float(alone)  # what it was before
    nothing = SimpleNamespace(images=images, instances=_instances([False, False], rows=()))
    zero, parts = loss(both, nothing)
    assert float(zero) == 0 and {"box", "seg", "cls"} <= set(parts)


def test_the_end_to_end_gain_schedule_is_ultralytics_own_and_a_function_of_the_epoch(seg_student):
    """on_epoch_start(k) leaves YOLO26's criterion as ultralytics' trainer has it at (0-based) epoch k - 1: after
    k - 1 update() calls; a fresh loss (a resumed run's) set to epoch k equals one stepped through every epoch."""
    head, epochs = seg_student.heads["instances"], 5
    stepped = UltralyticsTaskLoss(head)
    theirs = head.model_class.init_criterion(SimpleNamespace(args=stepped._loss.one2one.hyp, model=[head.detect],
                                                             parameters=head.parameters))
    theirs.one2one.hyp.epochs = epochs
    for epoch in range(1, epochs + 1):
        stepped.on_epoch_start(epoch, epochs)
        resumed = UltralyticsTaskLoss(head)
        resumed.on_epoch_start(epoch, epochs)
        got = [(loss._loss.o2m, loss._loss.o2o) for loss in (stepped, resumed)]
        assert got == [pytest.approx((theirs.o2m, theirs.o2o))] * 2, epoch
        theirs.update()  # ultralytics' trainer, at the end of the epoch
    assert theirs.o2m < 0.8 and stepped._loss.o2m == pytest.approx(0.1)
    fixed = UltralyticsTaskLoss(head, epochs=9)  # the loss's own epochs win over the run's
    fixed.on_epoch_start(5, epochs)
    assert fixed._loss.o2m == pytest.approx(0.8 - 4 / 8 * 0.7)


def test_an_ultralytics_head_without_a_loss_entry_trains_with_its_own_criterion(seg_student):
    """No task loss reads the head: {type: ultralytics} is implied; another task loss on it is refused."""
    (term,) = build_loss_terms({}, seg_student, {}, {})
    assert (term.name, term.kind, term.head, term.log_name) == ("instances", "task", "instances", "loss_instances")
    assert isinstance(term.module, UltralyticsTaskLoss)
    named = build_loss_terms({"mine": {"type": "ultralytics", "head": "instances", "box": 5.0}}, seg_student, {}, {})
    assert [t.name for t in named] == ["mine"]
    with pytest.raises(ConfigError, match="set type: ultralytics"):
        build_loss_terms({"seg": {"type": "instance_segmentation", "head": "instances"}}, seg_student, {}, {})
