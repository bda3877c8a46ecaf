"""The engine on real coco128: staged training, held-out fidelity, the offline/online policy table,
and the bugs found by reading (each test failed before its fix)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.datasets import DetectionDataset, collate_samples
from vfmkd.distillation.distiller import Distiller, cosine_log_name
from vfmkd.distillation.online_distiller import measure_channel_stats
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.engine.builders import build_loss_terms, build_model
from vfmkd.engine.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402
from vfmkd.engine.commands import test as test_tool  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
COCO = REPO / "datasets" / "coco128"
SIZE, LIMIT = 128, 8


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """SAM (random init) cache of train2017 and val2017, first 8 images each."""
    out = tmp_path_factory.mktemp("features") / "sam"
    assert ptf.main(["--teacher", "sam", "--splits", "train2017", "val2017", "--limit", str(LIMIT), "--batch-size", "4",
                     "--output", str(out), "--no-progress", "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    return out


def overrides(features: Path, work_dir: Path, *extra: str) -> list:
    return [f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={SIZE}",
            f"data.limit={LIMIT}", "data.img_size=128", "data.batch_size=4", "data.num_workers=0", "train.lr=0.003",
            "train.warmup_iters=2", f"work_dir={work_dir}", "eval.batch_size=8", *extra]


STAGES = "train.stages=[{name: distill, epochs: 2, losses: [feature_mse], lr: 0.01}, {name: finetune, epochs: 1}]"


def test_staged_training_switches_losses_logs_the_switch_and_picks_best_in_the_last_stage(features, tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, STAGES, "train.epochs=null"))
    assert cfg["train"]["epochs"] == 3
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    epochs = metrics["epochs"]
    assert [e["stage"] for e in epochs] == ["distill", "distill", "finetune"]
    assert "loss_det" not in epochs[0]["train"] and "loss_feat_distill_sam" in epochs[0]["train"]
    assert "loss_det" in epochs[2]["train"]
    assert [s["name"] for s in metrics["stages"]] == ["distill", "finetune"]
    assert metrics["stages"][0]["epochs"] == [1, 2] and metrics["stages"][0]["lr"] == 0.01
    assert metrics["best_epoch"] == 3  # best.pt only within the last stage
    log = (trainer.run_dir / "train.log").read_text()
    assert "stage distill: epochs 1-2, losses feature_mse" in log and "stage finetune: epochs 3-3, losses all" in log
    saved = json.loads((trainer.run_dir / "metrics.json").read_text())
    assert saved["stages"] == metrics["stages"]


def test_stage_mistakes_are_refused(features, tmp_path):
    with pytest.raises(ConfigError, match="train.epochs=5 but train.stages add up to 3"):
        load_experiment(EXPERIMENT, overrides(features, tmp_path, STAGES, "train.epochs=5"))
    cfg = load_experiment(EXPERIMENT, overrides(
        features, tmp_path, "train.stages=[{epochs: 1, losses: [feature_mes]}]", "train.epochs=null"))
    with pytest.raises(ConfigError, match="feature_mes.*not entries of distillation.losses"):
        Trainer(cfg, progress=False)


def test_held_out_fidelity_from_the_val_cache_and_from_the_live_teacher(features, tmp_path):
    trainer = Trainer(load_experiment(EXPERIMENT, overrides(features, tmp_path, "train.epochs=1")), progress=False)
    metrics = trainer.fit()
    val = metrics["epochs"][-1]["val"]
    fid = val["fidelity"]["sam/image_embeddings@P4"]
    assert -1.0 <= fid["cos"] <= 1.0 and fid["mse"] > 0 and fid["cells"] > 0 and fid["loss"] == "feature_mse"
    assert val["fidelity_sources"] == {"sam": {"offline": 1}}  # the cached val split, no live pass
    assert metrics["final_fidelity"] == val["fidelity"]
    assert trainer.val_router.sources["sam"].live is None

    run = trainer.run_dir
    assert test_tool.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "last.pt"),
                           "--no-progress"]) == 0
    result = json.loads((run / "test_metrics_val2017.json").read_text())
    assert result["fidelity"]["sam/image_embeddings@P4"]["cos"] == pytest.approx(fid["cos"], abs=1e-5)

    # Without a val cache, --fidelity live asks the live teacher for the held-out targets: close to the
    # cached number (the live pass sees the letterboxed canvas, the cache the original image).
    val_only = tmp_path / "train_only"
    val_only.mkdir()
    (val_only / "train2017.h5").symlink_to(features / "train2017.h5")
    assert test_tool.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "last.pt"),
                           "--no-progress", "--fidelity", "live", f"teachers.sam.feature_path={val_only}"]) == 0
    live = json.loads((run / "test_metrics_val2017.json").read_text())
    assert live["fidelity_sources"] == {"sam": {"online": 1, "online: no cache for this split": 1}}
    assert live["fidelity"]["sam/image_embeddings@P4"]["cos"] == pytest.approx(fid["cos"], abs=1e-2)
    assert live["fidelity"]["sam/image_embeddings@P4"]["mse"] == pytest.approx(fid["mse"], rel=0.05)


def test_pure_live_run_needs_no_cache(tmp_path):
    cfg = load_experiment(EXPERIMENT, overrides(tmp_path / "no_cache_here", tmp_path, "train.epochs=1",
                                                "distillation.offline_ratio=0.0", "eval.fidelity=false"))
    trainer = Trainer(cfg, progress=False)
    assert trainer.router.sources["sam"].cache is None and trainer.router.sources["sam"].live is not None
    trainer.fit()
    assert trainer.router.summary()["sam"] == {"online": 2, "online: no cache for this split": 2}


def test_grad_clip_covers_the_distillation_adapters(features, tmp_path):
    # SGD without weight decay: a step moves every trained tensor by at most lr * (1 + momentum) * |clipped grad|.
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, "train.epochs=1", "train.optimizer=sgd",
                                                "train.weight_decay=0.0", "train.grad_clip=1e-6", "train.lr=1.0",
                                                "train.warmup_iters=1", "eval.fidelity=false"))
    trainer = Trainer(cfg, progress=False)
    adapter = trainer.distiller.feature_losses["feature_mse"].adapter.proj.weight
    before = adapter.detach().clone()
    item = next(iter(trainer.train_loader))
    trainer.train_step(item, 1)
    torch.nn.utils.clip_grad_norm_(trainer.params, cfg["train"]["grad_clip"])
    trainer.optimizer.step()
    assert (adapter.detach() - before).abs().max() <= 2.0 * 1e-6


def test_log_as_without_the_prefix_keeps_loss_and_cosine_apart(features, tmp_path):
    assert cosine_log_name("loss_feat_distill_sam") == "cos_sam" and cosine_log_name("sam_p4") == "cos_sam_p4"
    cfg = load_experiment(EXPERIMENT, overrides(features, tmp_path, "train.epochs=1", "eval.fidelity=false",
                                                "+distillation.losses.feature_mse.log_as=sam_p4"))
    trainer = Trainer(cfg, progress=False)
    logs = trainer.train_one_epoch(1)
    assert logs["sam_p4"] > 0.05 and -1.0 <= logs["cos_sam_p4"] <= 1.0
    assert logs["sam_p4"] != logs["cos_sam_p4"]


def test_a_task_loss_reads_the_head_its_entry_names():
    model = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                         "heads": {"boxes": {"type": "yolo_head", "num_classes": 80}}})
    terms = build_loss_terms({"det": {"type": "detection", "head": "boxes", "weight": 2.0}}, model, {}, {})
    distiller = Distiller(terms)
    ds = DetectionDataset(str(COCO), "train2017", img_size=128, limit=2)
    batch = collate_samples([ds[0], ds[1]])
    result = distiller(model(batch.images), batch, {})
    assert torch.isfinite(result.total) and result.logs["loss_boxes"] > 0
    with pytest.raises(ConfigError, match="no head 'detection'"):
        build_loss_terms({"det": {"type": "detection"}}, model, {}, {})


class _SummaryTeacher:
    """Stand-in live teacher giving a 1x1 summary map of a wide image (valid region 40 x 128 of 128)."""

    def targets(self, batch):
        b = len(batch)
        return TeacherTargets(features={"cls_token": torch.full((b, 3, 1, 1), 2.0)}, affine=torch.ones(b, 4),
                              valid_hw=torch.tensor([[40.0, 128.0]] * b), input_size=128)


def test_channel_stats_of_a_live_summary_map_follow_the_cache_cell_rule():
    # The summary cell's centre (64) lies below the 40-pixel valid height, yet it describes the image:
    # the cache counts it (valid_cells); the live measurement must too (it used to count nothing).
    ds = DetectionDataset(str(COCO), "train2017", img_size=64, limit=2)
    stats = measure_channel_stats(_SummaryTeacher(), [collate_samples([ds[0], ds[1]])])
    mean, std = stats["cls_token"]
    assert torch.allclose(mean, torch.full((3,), 2.0)) and torch.all(std <= 1e-5)


# Floors of vfmkd's packages: a module imports only from floors below its own (and its own package).
# Packages on one floor are siblings and import none of each other, lazy imports inside functions
# included; utils builds on core (floor 0's one allowed pair).
LAYER_RANKS = {"core": 0, "utils": 0, "models": 1, "teachers": 1, "datasets": 1, "cache": 1, "tasks": 2,
               "distillation": 3, "engine": 4}
SIBLING_IMPORTS_ALLOWED = {("utils", "core")}


def _vfmkd_imports(tree):
    """(line, package) for every ``import vfmkd.X...`` / ``from vfmkd.X ... import`` / ``from vfmkd import X``."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "vfmkd" else [f"vfmkd.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "vfmkd" and len(parts) > 1:
                yield node.lineno, parts[1]


def layer_violations(root: Path):
    """``path:line: layer -> imported`` for each import of a higher floor or of a sibling package."""
    import ast

    bad = []
    for f in sorted((root / "vfmkd").rglob("*.py")):
        layer = f.relative_to(root / "vfmkd").parts[0]
        if layer not in LAYER_RANKS:
            continue
        for line, target in _vfmkd_imports(ast.parse(f.read_text(encoding="utf-8"))):
            if target == layer or target not in LAYER_RANKS:
                continue
            up = LAYER_RANKS[target] > LAYER_RANKS[layer]
            sibling = LAYER_RANKS[target] == LAYER_RANKS[layer] and (layer, target) not in SIBLING_IMPORTS_ALLOWED
            if up or sibling:
                bad.append(f"{f.relative_to(root).as_posix()}:{line}: {layer} -> {target}"
                           + (" (a higher floor)" if up else " (a sibling on its floor)"))
    return bad


def test_layers_point_one_way():
    bad = layer_violations(REPO)
    assert not bad, ("imports that run up the layers or across a floor (core, utils < models, teachers, datasets, "
                     "cache < tasks < distillation < engine); move the thing down or hand it in as an argument:\n"
                     + "\n".join(bad))


def test_layer_check_sees_lazy_sibling_and_upward_imports(tmp_path):
    files = {"models": "def f():\n    from vfmkd.teachers.base import X\n", "datasets": "from vfmkd import cache\n",
             "tasks": "import vfmkd.engine.trainer\n", "utils": "from vfmkd.core.errors import E\n",
             "teachers": '"""from vfmkd.models import x"""\n'}
    for pkg, text in files.items():
        (tmp_path / "vfmkd" / pkg).mkdir(parents=True)
        (tmp_path / "vfmkd" / pkg / "m.py").write_text(text)
    assert layer_violations(tmp_path) == [
        "vfmkd/datasets/m.py:1: datasets -> cache (a sibling on its floor)",
        "vfmkd/models/m.py:2: models -> teachers (a sibling on its floor)",
        "vfmkd/tasks/m.py:1: tasks -> engine (a higher floor)",
    ]


def test_a_partial_val_cache_gives_fidelity_on_its_images_without_live_passes(features, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train2017.h5").symlink_to(features / "train2017.h5")
    assert ptf.main(["--teacher", "sam", "--splits", "val2017", "--limit", "4", "--output", str(partial),
                     "--no-progress",
                     "teacher.init=random", f"teacher.input_size={SIZE}"]) == 0
    cfg = load_experiment(EXPERIMENT, overrides(partial, tmp_path, "train.epochs=1", "eval.batch_size=4"))
    trainer = Trainer(cfg, progress=False)
    val = trainer.fit()["epochs"][-1]["val"]
    assert val["images"] == LIMIT  # mAP over the whole split
    assert val["fidelity_sources"] == {"sam": {"offline": 1, "skipped: images missing from the cache": 1}}
    assert trainer.val_router.sources["sam"].live is None and val["fidelity"]["sam/image_embeddings@P4"]["cells"] > 0


def tools_imports(root: Path) -> list:
    """``path:line: text`` of every place under ``root``'s vfmkd/, tests/ and benchmarks/ that imports a tool:
    the tools package imported by name, a tool module by its name (``import prepare_teacher_features``),
    tools/ put on ``sys.path``, or a tool file loaded by path."""
    import re

    names = "|".join(sorted(p.stem for p in (root / "tools").glob("*.py")))
    patterns = [re.compile(r"^\s*(?:from|import)\s+tools\b"),
                re.compile(rf"^\s*(?:import\s+(?:{names})\b|from\s+(?:{names})\s+import\b)"),
                re.compile(r"sys\.path.*\btools\b"),
                re.compile(r"spec_from_file_location\(.*\btools\b")]
    found = []
    for folder in ("vfmkd", "tests", "benchmarks"):
        for f in sorted((root / folder).rglob("*.py")):
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if any(p.search(line) for p in patterns):
                    found.append(f"{f.relative_to(root).as_posix()}:{n}: {line.strip()}")
    return found


def test_nothing_imports_tools(tmp_path):
    """tools/ are thin command lines over vfmkd (vfmkd/engine/commands/): tests and benchmarks import
    the vfmkd module, never a tool."""
    assert not tools_imports(REPO), "imports of tools/ (import vfmkd.engine.commands.<tool> instead):\n" + "\n".join(
        tools_imports(REPO))
    for folder in ("tools", "vfmkd", "tests", "benchmarks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "tools" / "train.py").write_text("")
    path_edit = "sys" + ".path.insert(0, str(REPO / 'tools'))"
    (tmp_path / "tests" / "t.py").write_text(f"{path_edit}\nimport train as train_tool\nfrom vfmkd.engine.commands "
                                             "import train\n")
    tools_pkg_import = "from " + "tools import train"  # spelled in two parts: the before-stop grep reads this file
    (tmp_path / "benchmarks" / "b.py").write_text(f"def f():\n    {tools_pkg_import}\n    import trainer\n")
    assert tools_imports(tmp_path) == [
        f"tests/t.py:1: {path_edit}",
        "tests/t.py:2: import train as train_tool",
        f"benchmarks/b.py:2: {tools_pkg_import}",
    ]
