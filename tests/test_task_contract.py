"""The task contract, for every registered task (timm style): a real head of the task on a real coco128
batch, read through the task's typed output; the label kinds the task asks for are loaded; its
default loss is registered (and trains the head when it is a task loss). A new task adds its case
to HEADS_OF_TASK."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import vfmkd.distillation.losses  # noqa: F401  (registers the losses)
from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import HEADS, LOSSES, TASKS
from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.datasets.records import LABEL_KINDS
from vfmkd.models.heads import BaseHead
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import Task, get_task, label_kinds_of, task_of, tasks_of

SIZE, SPLIT = 128, "train2017"
BUILT_IN = ("binary", "detection", "instance", "panoptic_query", "promptable", "semantic")
#: task -> the heads of that task the contract runs on (config entries; "semantic" num_classes comes from the data)
HEADS_OF_TASK = {
    "detection": [{"type": "yolo_head", "num_classes": 80},
                  {"type": "rtdetr_head", "num_classes": 80, "num_queries": 20, "num_decoder_layers": 1,
                   "hidden_dim": 64, "ffn_dim": 128, "num_denoising": 10}],
    "instance": [{"type": "yolo_seg_head", "num_classes": 80, "num_protos": 32}],
    "semantic": [{"type": "semantic_head"}],
    "panoptic_query": [{"type": "rapsam_head", "num_queries": 8, "channels": 32, "num_heads": 2, "ffn_dim": 64}],
    "binary": [{"type": "binary_head"}],
    "promptable": [{"type": "sam_decoder"}],
}


@pytest.fixture(scope="module")
def batches(coco128):
    """Label kinds -> (dataset, a 2-image batch) of coco128 loaded with those kinds."""
    made = {}

    def get(kinds):
        key = frozenset(kinds)
        if key not in made:
            ds = DetectionDataset(str(coco128), SPLIT, img_size=SIZE, limit=2, instances="instances" in key,
                                  semantic="semantic" in key, binary_classes=("person",) if "binary" in key else ())
            made[key] = ds, collate_samples([ds[0], ds[1]])
        return made[key]

    return get


def test_every_built_in_task_is_registered_and_has_a_contract_case():
    import vfmkd.tasks  # noqa: F401

    assert set(BUILT_IN) <= set(TASKS.names())
    assert set(BUILT_IN) == set(HEADS_OF_TASK)
    for cls in {HEADS.get(n) for n in HEADS.names()}:
        if cls.__module__.startswith("vfmkd."):  # every built-in head is a BaseHead of a registered task
            assert issubclass(cls, BaseHead) and task_of(cls).name in BUILT_IN, cls


@pytest.mark.parametrize("name", BUILT_IN)
def test_task_properties(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    assert task.label_kinds <= set(LABEL_KINDS)
    assert task.default_loss in LOSSES
    assert set(task.teacher_tasks) <= set(TASKS.names())
    assert dataclasses.is_dataclass(task.output_type)
    assert not (task.box_classes and task.semantic_classes)


@pytest.mark.parametrize("name", BUILT_IN)
def test_task_reads_its_heads_outputs_on_coco128(name, batches):
    task = get_task(name)
    dataset, batch = batches(task.label_kinds)
    for kind in task.label_kinds:  # the dataset loads what the task asks for
        assert getattr(batch, kind) is not None, kind
    for entry in HEADS_OF_TASK[name]:
        entry = dict(entry)
        if task.semantic_classes:
            entry["num_classes"] = dataset.semantic_num_classes
        torch.manual_seed(0)
        model = UnifiedModel.from_config({"backbone": {"type": "yolov8", "variant": "n"},
                                          "neck": {"type": "yolov8_pafpn", "depth": 1}, "heads": {name: entry}})
        head = model.heads[name]
        assert task_of(head).name == name and isinstance(head, BaseHead)
        assert all(level in model(batch.images).neck for level in head.level_names)
        for training in (True, False):
            model.train(training)
            raw = model(batch.images).heads[name]
            out = task.read_output(raw)
            assert isinstance(out, task.output_type), (entry["type"], training)
            values = [getattr(out, f.name) for f in dataclasses.fields(out)]
            tensors = [t for v in values for t in (v if isinstance(v, list) else [v]) if torch.is_tensor(t)]
            assert tensors and all(t.shape[0] == 2 for t in tensors), (entry["type"], training)
        if not isinstance(raw, torch.Tensor):
            assert task.read_output(raw).raw is raw  # structured outputs keep the head's own layout


@pytest.mark.parametrize("name", [n for n in BUILT_IN if getattr(LOSSES.get(get_task(n).default_loss), "kind",
                                                                   "") == "task"])
def test_default_task_loss_trains_the_first_head(name, batches, coco128):
    from vfmkd.engine.builders import build_loss_terms, output_class_channels

    task = get_task(name)
    dataset, batch = batches(task.label_kinds)
    entry = dict(HEADS_OF_TASK[name][0])
    if task.semantic_classes:
        entry["num_classes"] = dataset.semantic_num_classes
    model = UnifiedModel.from_config({"backbone": {"type": "yolov8", "variant": "n"},
                                      "neck": {"type": "yolov8_pafpn", "depth": 1}, "heads": {name: entry}}).train()
    # built as the engine builds it (the loss's build_term hook, with the dataset's class tables)
    (term,) = build_loss_terms({"task": {"type": task.default_loss, "head": name}}, model, {}, {},
                               class_channels=output_class_channels(str(coco128)))
    out = model(batch.images)
    value, _ = term.module(out if getattr(term.module, "reads_student_output", False) else out.heads[name], batch)
    value.backward()
    assert torch.isfinite(value) and any(p.grad is not None for p in model.heads[name].parameters())


def test_instance_mask_logits_agree_with_the_head():
    from vfmkd.core.feature_spec import FeatureSpec

    specs = [FeatureSpec("P3", 16, 8), FeatureSpec("P4", 32, 16), FeatureSpec("P5", 64, 32)]
    head = HEADS.build("yolo_seg_head", in_specs=specs, num_classes=3, num_masks=4, num_protos=8).train()
    torch.manual_seed(0)
    raw = head({s.name: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride) for s in specs})
    boxes, cls, idx = torch.tensor([[4.0, 4.0, 40.0, 30.0], [10.0, 20.0, 60.0, 60.0]]), torch.tensor([0, 2]), \
        torch.tensor([0, 1])
    anchors = head.match_anchors(raw, boxes, cls, idx)
    out = task_of(head).read_output(raw)
    assert torch.equal(out.mask_logits(anchors, idx), head.instance_mask_logits(raw, boxes, cls, idx))


def test_unknown_task_and_a_head_without_one_are_config_errors():
    with pytest.raises(ConfigError, match="unknown task type 'panoptic'.*Registered tasks: binary, detection"):
        get_task("panoptic")

    class NoTask(torch.nn.Module):
        pass

    class BadTask(BaseHead):
        task = "segmentaton"

    with pytest.raises(ConfigError, match="NoTask has no task name: subclass .*BaseHead"):
        task_of(NoTask())
    with pytest.raises(ConfigError, match="BadTask: unknown task type 'segmentaton'"):
        tasks_of({"h": BadTask})
    assert label_kinds_of([get_task("instance"), get_task("binary")]) == {"instances", "binary"}

    class DepthTask(type(get_task("semantic"))):
        name, label_kinds = "depth", frozenset({"depth"})

    with pytest.raises(ConfigError, match="task 'depth' asks for label kind.s. depth, which the dataset cannot load; "
                                          "it loads instances, semantic, binary"):
        label_kinds_of([get_task("semantic"), DepthTask()])
