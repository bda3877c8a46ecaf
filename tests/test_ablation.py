"""tools/ablate.py: the variants of a recipe and one real ablation on coco128 (each variant in its own process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vfmkd.core.config import load_experiment
from vfmkd.core.errors import ConfigError
from vfmkd.engine.training.ablation import variants

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import ablate as ablate_tool  # noqa: E402

pytestmark = pytest.mark.slow  # an end-to-end run of the tools: scheduled first (conftest)

RECIPE = REPO / "configs" / "experiments" / "regnet_fusion_dsrl_sam_panoptic_coco128.yaml"


def test_variants_switch_each_part_off_and_keep_the_stages_valid():
    cfg = load_experiment(RECIPE)
    out = variants(cfg)
    assert list(out) == ["full", "no_fusion", "no_dsrl", "no_teachers", "base"]
    assert (
        out["no_fusion"]["model"]["neck"]["fusion"] == "sum" and out["full"]["model"]["neck"]["fusion"] == "learnable"
    )
    assert not out["no_dsrl"]["model"]["resolution_distill"]["enabled"]
    assert all("resolution_distill" not in (s["losses"] or []) for s in out["no_dsrl"]["train"]["stages"])
    assert out["no_teachers"]["teachers"] == {}
    assert all(not e.get("teacher") for e in out["no_teachers"]["distillation"]["losses"].values())
    base = out["base"]
    assert (
        base["model"]["neck"]["fusion"] == "sum"
        and not base["model"]["resolution_distill"]["enabled"]
        and not base["teachers"]
    )
    assert cfg["teachers"], "the input config is not modified"
    with pytest.raises(ConfigError, match="parts are"):
        variants(cfg, ["fuson"])


def test_ablation_runs_and_writes_the_table(tmp_path):
    """The recipe's model without its teacher and DSRL (their costs are covered elsewhere): fusion on/off."""
    import yaml

    raw = yaml.safe_load(RECIPE.read_text())
    raw["teachers"] = {}
    raw["distillation"]["losses"] = {k: v for k, v in raw["distillation"]["losses"].items() if "teacher" not in v}
    raw["model"]["resolution_distill"]["enabled"] = False
    raw["train"].pop("stages")
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "ablation"
    assert ablate_tool.main([str(config), "--parts", "fusion", "--output", str(out), "train.epochs=1",
                             "data.limit=2", "data.img_size=128", "data.batch_size=2", "data.num_workers=0",
                             "eval.batch_size=2", "train.vis_interval=0", "model.neck.channels=32"]) == 0
    table = (out / "ablation.md").read_text()
    assert "| full |" in table and "| no_fusion |" in table and "PQ" in table
    rows = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in rows] == ["full", "no_fusion"]
    for r in rows:
        assert r["mIoU"] is not None and r["PQ"] is not None and r["peak_rss_mib"] > 0


def test_the_full_recipe_trains_its_progressive_stages(tmp_path):
    """regnet_fusion_dsrl_sam_panoptic_coco128 end to end (live random SAM, 1 epoch per stage): base ->
    + resolution distillation -> + SAM distillation, learnable fusion logged, PQ and mIoU at validation."""
    import yaml

    from vfmkd.core.config import experiment_from_dict
    from vfmkd.engine.training.trainer import Trainer

    raw = yaml.safe_load(RECIPE.read_text())
    for stage in raw["train"]["stages"]:
        stage["epochs"] = 1
    cfg = experiment_from_dict(raw, [
        "teachers.sam.offline=false", "teachers.sam.init=random", "teachers.sam.input_size=128", f"work_dir={tmp_path}",
        "data.limit=2", "data.img_size=128", "data.batch_size=2", "data.num_workers=0", "eval.batch_size=2",
        "train.vis_interval=0", "eval.fidelity=false", "distillation.standardize=false", "train.warmup_iters=1"])
    metrics = Trainer(cfg, progress=False).fit()
    epochs = metrics["epochs"]
    assert [e["stage"] for e in epochs] == ["base", "resolution", "sam"]
    assert "loss_resolution_distill" not in epochs[0]["train"] and "loss_resolution_distill" in epochs[1]["train"]
    assert "loss_mask_distill_instance" in epochs[2]["train"] and "loss_mask_distill_instance" not in epochs[1]["train"]
    for e in epochs:
        assert e["fusion_weights"] and {"PQ", "SQ",
                                        "RQ"} <= set(e["val"]["panoptic"]) and "mIoU" in e["val"]["semantic"]
