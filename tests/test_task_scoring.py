"""The evaluation half of the task contract, for every built-in task (test_task_contract.HEADS_OF_TASK
gives its heads): the task's scorer scores a real coco128 batch through ``evaluate`` (its primary metric
and fitness come out as numbers), its picture row is drawn with a student and a ground-truth column, and
the head that picks best.pt is the one whose task ranks lowest."""
from __future__ import annotations

import pytest
import torch
from test_task_contract import BUILT_IN, HEADS_OF_TASK

from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.engine.evaluation.evaluator import build_scorers, evaluate, primary_metric
from vfmkd.engine.pictures.epoch_vis import EpochVisualizer, semantic_class_names
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import get_task
from vfmkd.tasks.pictures import PanelRow, Prediction
from vfmkd.tasks.scoring.panoptic_metrics import STUFF, THINGS

SIZE, SPLIT = 128, "val2017"
BOX_NAMES = {i: f"class{i}" for i in range(80)}


def _model(name: str, entry: dict, dataset: DetectionDataset) -> UnifiedModel:
    entry = dict(entry)
    if get_task(name).semantic_classes:
        entry["num_classes"] = dataset.semantic_num_classes
    torch.manual_seed(0)
    return UnifiedModel.from_config({"backbone": {"type": "yolov8", "variant": "n"},
                                     "neck": {"type": "yolov8_pafpn", "depth": 1}, "heads": {name: entry}})


@pytest.mark.parametrize("name", BUILT_IN)
def test_task_scores_and_draws_its_heads_on_coco128(name, coco128, tmp_path):
    task = get_task(name)
    kinds = task.label_kinds
    dataset = DetectionDataset(str(coco128), SPLIT, img_size=SIZE, limit=2, instances="instances" in kinds,
                               semantic="semantic" in kinds, binary_classes=("person",) if "binary" in kinds else ())
    batch = collate_samples([dataset[0], dataset[1]])
    semantic_names = semantic_class_names(dataset)
    for k, entry in enumerate(HEADS_OF_TASK[name]):
        model = _model(name, entry, dataset)
        # the split, as the trainer passes it: a scorer that reads its own ground truth (panoptic_query's COCO
        # panoptic PNGs) finds it there
        scorers = build_scorers({name: name}, BOX_NAMES, semantic_names, data_root=str(coco128), split=SPLIT)
        vis = EpochVisualizer(tmp_path / str(k), "epoch", 1, {name: name}, None, BOX_NAMES, semantic_names, 2)
        result = evaluate(model, [batch], scorers, torch.device("cpu"), progress=False, on_batch=vis.on_batch)
        scores = result[name]
        assert scores["images"] == 2, (entry["type"], scores)
        metric, short = task.primary_metric
        assert isinstance(scores[metric], float) and short, entry["type"]
        assert isinstance(task.fitness(scores), float)
        head, key, value, fitness, tag = primary_metric(result, {name: name})
        assert (head, key) == (name, metric) and tag.startswith(short)
        assert vis.written and vis.written[0].is_file(), entry["type"]

        with torch.no_grad():
            out = model.eval()(batch.images)
        rows = vis.rows(out, batch, {})
        assert len(rows) == 1 and isinstance(rows[0], PanelRow)
        for column in (rows[0].student, rows[0].target):
            assert isinstance(column, Prediction) and column.num_images == 2, entry["type"]


def test_best_pt_head_and_panoptic_parts_come_from_the_tasks():
    ranks = {name: get_task(name).best_rank for name in BUILT_IN}
    assert len(set(ranks.values())) == len(ranks)  # no ties between built-in tasks
    order = sorted(BUILT_IN, key=ranks.get)
    assert order == ["panoptic_query", "promptable", "instance", "semantic", "binary", "detection"]
    scores = {"panoptic_query": {"PQ": 0.6},
              "promptable": {"mIoU": 0.5}, "instance": {"mask_mAP50-95": 0.4}, "semantic": {"mIoU": 0.3},
              "binary": {"dice": 0.2}, "detection": {"mAP50": 0.3, "mAP50-95": 0.1}}
    for drop in range(len(order)):
        tasks = {f"h_{n}": n for n in order[drop:]}
        result = {f"h_{n}": scores[n] for n in order[drop:]}
        head, metric, value, fitness, _ = primary_metric(result, tasks)
        assert head == f"h_{order[drop]}" and value == scores[order[drop]][metric]
    assert fitness == pytest.approx(0.1 * 0.3 + 0.9 * 0.1)  # detection alone: ultralytics' fitness
    parts = {name: get_task(name).panoptic_part for name in BUILT_IN}
    assert parts == {"binary": None, "detection": None, "instance": THINGS, "panoptic_query": None, "promptable": None,
                     "semantic": STUFF}
