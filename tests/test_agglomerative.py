"""The agglomerative recipe parts (issue 20; docs/agglomerative.md), each with the check that fails without it:
PHI-S standardisation stored with the cache, the summary loss, teacher dropping, multi-resolution training."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vfmkd.cache.reader import FeatureCacheReader
from vfmkd.cache.writer import FeatureCacheWriter
from vfmkd.core.errors import ConfigError
from vfmkd.core.feature_spec import FeatureSpec
from vfmkd.core.fingerprint import TeacherFingerprint
from vfmkd.datasets.records import Batch, BatchViews, DetectionBatch, ViewGeometry
from vfmkd.distillation.cached import DistillBatch
from vfmkd.distillation.distiller import Distiller
from vfmkd.distillation.geometry import resample_to_student
from vfmkd.distillation.losses.summary import SummaryDistillLoss
from vfmkd.distillation.prefetch import TargetPrefetcher
from vfmkd.distillation.routing import TeacherRouter, TeacherSource
from vfmkd.distillation.targets import TeacherTargets
from vfmkd.distillation.teacher_drop import TeacherDropper
from vfmkd.distillation.terms import LossEntry, TermContext
from vfmkd.engine.training.multi_resolution import ResolutionSampler, rescale_batch
from vfmkd.engine.training.teacher_stats import standardize_mode
from vfmkd.models.unified_model import StudentOutput

FP = TeacherFingerprint("toy", "v", "random-init", 32, "float32", "toy")
EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "yolo11s_radio_dinov3_sam_coco128.yaml"


def write_cache(path, feats: torch.Tensor, stride: int) -> FeatureCacheReader:
    """A finished float16 cache of ``feats`` (N, C, h, w) under feature 'f', every cell valid."""
    n, c, h, _ = feats.shape
    with FeatureCacheWriter(path, [f"im{i}" for i in range(n)], FP, [FeatureSpec("f", c, stride)], h * stride,
                            teacher_config={}, dataset="d", split="train2017", batch_size=n) as w:
        w.write(0, {"f": feats}, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n), torch.full((n, 2), float(h * stride)),
                np.full((n, 2), h * stride))
        w.finalize()
    return FeatureCacheReader(path)


def correlated(n: int, c: int, scale: float, seed: int) -> torch.Tensor:
    """(n, c, 8, 8) features with correlated channels whose scales spread over 10^+-1.5, times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) * torch.logspace(-1.5, 1.5, c)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, 8, 8, generator=g)) * scale + 3.0
    return x


def vectors(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]).double()


def distance_ratio_spread(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative spread of ||y_i - y_j|| / ||x_i - x_j|| over vector pairs: 0 for a rotation times a scalar."""
    ratio = torch.pdist(y[:200]) / torch.pdist(x[:200])
    return float(ratio.std() / ratio.mean())


def test_phi_s_is_stored_with_the_cache_isotropic_equal_across_teachers_and_invertible(tmp_path):
    readers = {"a": write_cache(tmp_path / "a.h5", correlated(4, 24, 40.0, 0), 4),  # 24 = Paley 24: Hadamard
               "b": write_cache(tmp_path / "b.h5", correlated(4, 10, 0.01, 1), 4)}  # 10: no Hadamard, Givens
    for name, reader in readers.items():
        phi = reader.phi_s("f")
        assert phi is not None, f"{name}: the cache stores no PHI-S transform"
        x = torch.stack([reader.read(f"im{i}")["features"]["f"].float() for i in range(4)])
        y = phi.apply(x)
        var = vectors(y).var(dim=0, unbiased=False)
        assert torch.allclose(var, torch.ones_like(var), atol=2e-3), f"{name}: per-dimension variance {var}"
        assert distance_ratio_spread(vectors(x), vectors(y)) < 1e-4  # isotropic: one rotation, one scale
        mean, std = reader.stats("f")
        zscore = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        assert distance_ratio_spread(vectors(x), vectors(zscore)) > 0.05  # per-channel z-score distorts
        assert torch.allclose(phi.invert(y), x, rtol=1e-4, atol=1e-3 * float(x.abs().max()))
    assert standardize_mode("phi_s") == "phi_s" and standardize_mode(True) == "zscore" and standardize_mode(False) == ""
    with pytest.raises(ConfigError, match="phi_s"):
        standardize_mode("pca")


# ---------------------------------------------------------------------------------- summary loss + dropping
def context() -> TermContext:
    model = SimpleNamespace(backbone=SimpleNamespace(feature_specs=lambda: [FeatureSpec("P3", 4, 8),
                                                                           FeatureSpec("P5", 8, 32)]), heads={})
    specs = {t: [FeatureSpec("patch_tokens", 6, 16), FeatureSpec("summary", 6, 64)] for t in ("dino", "radio")}
    return TermContext(model, specs, {t: "patch_tokens" for t in specs}, {})


def summary_targets(batch: int = 2) -> TeacherTargets:
    g = torch.Generator().manual_seed(1)
    return TeacherTargets(features={"summary": torch.randn(batch, 6, 1, 1, generator=g),
                                    "patch_tokens": torch.randn(batch, 6, 4, 4, generator=g)},
                          affine=torch.tensor([[1.0, 1.0, 0.0, 0.0]] * batch), valid_hw=torch.full((batch, 2), 64.0),
                          input_size=64)


def tiny_batch(size: int = 64, n: int = 2) -> Batch:
    view = ViewGeometry(matrix=np.array([[1.0, 0, 0], [0, 1.0, 0]]), affine=(1.0, 1.0, 0.0, 0.0),
                        content_box=(0, 0, size, size), orig_hw=(size, size))
    return Batch(images=torch.zeros(n, 3, size, size), image_ids=[f"im{i}" for i in range(n)],
                 views=BatchViews.stack([view] * n), boxes=DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4),
                                                                          torch.zeros(0)))


def test_summary_loss_matches_the_teacher_summary_token_with_a_pooled_student_head():
    ctx = context()
    terms = [SummaryDistillLoss.build_term(LossEntry(f"{t}_summary", "summary_distill", 1.0, "",
                                                     {"teacher": t, "cosine_weight": 1.0, "smooth_l1_weight": 0.5}),
                                           ctx) for t in ("dino", "radio")]
    module = terms[0].module
    assert (module.teacher_feature, module.student_level) == ("summary", "P5")  # the summary token by default
    assert terms[0].log_name == "loss_feat_distill_dino_summary"
    distiller = Distiller(terms)
    student = torch.randn(2, 8, 2, 2, requires_grad=True)
    out = StudentOutput(backbone={"P5": student}, neck={}, heads={})
    result = distiller(out, tiny_batch(), {"dino": summary_targets(), "radio": summary_targets()})
    assert {"loss_feat_distill_dino_summary", "cos_dino_summary"} <= set(result.logs)
    result.total.backward()
    assert student.grad is not None and bool((student.grad != 0).all())  # every cell feeds the pooled head
    # teacher dropping's renormalisation: radio dropped, dino's term x 2 keeps the total's expected size
    only_dino = distiller(out, tiny_batch(), {"dino": summary_targets()}, teacher_scale={"dino": 2.0})
    dino = only_dino.logs["loss_feat_distill_dino_summary"]
    assert float(only_dino.total.detach()) == pytest.approx(2.0 * dino, rel=1e-6)


def test_teacher_drop_never_drops_all_renormalises_and_is_seeded():
    teachers = ["dino", "radio", "sam"]
    draws = [TeacherDropper(0.5, seed=3).draw(step, teachers) for step in range(400)]
    assert all(d.kept for d in draws)
    assert all(d.scale == {t: 3 / len(d.kept) for t in d.kept} for d in draws)
    for t in teachers:
        dropped = sum(t in d.dropped for d in draws) / len(draws)
        assert 0.35 < dropped < 0.6, (t, dropped)
    again = [TeacherDropper(0.5, seed=3).draw(step, teachers).kept for step in range(400)]
    assert again == [d.kept for d in draws]  # a function of (seed, step): resumes and ranks agree
    assert again != [TeacherDropper(0.5, seed=4).draw(step, teachers).kept for step in range(400)]
    counts = TeacherDropper(0.5, seed=3).counts(range(100, 400), teachers)
    assert counts == {"steps": 300, **{t: sum(t in d.dropped for d in draws[100:]) for t in teachers}}
    with pytest.raises(ConfigError, match="teacher_drop_prob"):
        TeacherDropper(1.0, seed=0)


class CountingTeacher:
    """A live teacher stand-in that counts its forward passes."""

    def __init__(self) -> None:
        self.passes = 0

    def targets(self, batch: Batch) -> TeacherTargets:
        self.passes += 1
        return summary_targets(len(batch))


@pytest.mark.parametrize("mode", ["off"])
def test_a_dropped_live_teacher_is_not_run(mode):
    live = {t: CountingTeacher() for t in ("dino", "radio", "sam")}
    sources = {t: TeacherSource(t, False, None, lambda h, w, s: (1.0, 1.0, 0.0, 0.0), lambda m=m: m, live=m)
               for t, m in live.items()}
    dropper = TeacherDropper(0.5, seed=0)
    prefetcher = TargetPrefetcher(TeacherRouter(sources, 1.0, seed=0), torch.device("cpu"), mode)
    items = [DistillBatch(tiny_batch(32, 1)) for _ in range(30)]
    seen = list(prefetcher.epoch(items, 0, 1, dropper.plan(sorted(live))))
    for prepared in seen:
        assert sorted(prepared.targets) == dropper.draw(prepared.step, sorted(live)).kept
    assert sum(m.passes for m in live.values()) == sum(len(p.targets) for p in seen) < 30 * 3 * 0.75


# ---------------------------------------------------------------------------------- multi-resolution
def test_resolution_sampler_is_seeded_and_uses_every_size():
    sizes = [256, 320, 416, 512]
    drawn = [ResolutionSampler(sizes, seed=1).size_of(s) for s in range(200)]
    assert set(drawn) == set(sizes)
    assert drawn == [ResolutionSampler(sizes, seed=1).size_of(s) for s in range(200)]
    assert ResolutionSampler([], seed=1).size_of(5) is None
    with pytest.raises(ConfigError, match="multiples of 32"):
        ResolutionSampler([250], seed=0)


def test_rescaled_batch_gets_teacher_targets_at_the_right_place():
    """A cached map whose channel 0 is each cell's ORIGINAL x coordinate lands on the rescaled student grid where
    the rescaled view says: every valid cell reads the original x of its own centre."""
    orig_h, orig_w, canvas = 100, 160, 64
    s = canvas / orig_w  # letterbox: long side to the canvas, centred vertically
    oy = (canvas - orig_h * s) / 2
    view = ViewGeometry(matrix=np.array([[s, 0, 0], [0, s, oy]]), affine=(s, s, 0.0, oy),
                        content_box=(0, int(oy), canvas, int(oy + orig_h * s)), orig_hw=(orig_h, orig_w))
    batch = Batch(images=torch.rand(1, 3, canvas, canvas), image_ids=["im0"], views=BatchViews.stack([view]),
                  boxes=DetectionBatch(torch.zeros(0, 1), torch.zeros(0, 4), torch.zeros(0)),
                  semantic=torch.ones(1, canvas, canvas, dtype=torch.int64))
    t_size, t_stride, t_scale = 128, 4, 128 / orig_w  # the cached teacher: long side to 128
    centres = (torch.arange(t_size // t_stride) + 0.5) * t_stride / t_scale  # original x of each teacher cell
    t_map = centres.view(1, 1, 1, -1).expand(1, 1, t_size // t_stride, -1).contiguous()
    for size in (32, 96):
        small = rescale_batch(batch, size)
        assert small.images.shape[-1] == size and small.semantic.shape[-1] == size
        stride = 8
        sampled, mask = resample_to_student(t_map, torch.tensor([[t_scale, t_scale, 0.0, 0.0]]),
                                            torch.tensor([[orig_h * t_scale, float(t_size)]]), (t_size, t_size),
                                            small.views.affine, (size // stride, size // stride), stride)
        sx = float(small.views.affine[0, 0])
        expected = ((torch.arange(size // stride) + 0.5) * stride / sx).view(1, 1, 1, -1).expand_as(sampled)
        inner = mask.bool() & (expected > t_stride / t_scale) & (expected < orig_w - t_stride / t_scale)
        assert bool(inner.any())
        assert torch.allclose(sampled[inner], expected[inner], atol=0.5)


def test_the_experiment_turns_every_part_on():
    from vfmkd.core.config import experiment_record, load_experiment

    exp = experiment_record(load_experiment(EXPERIMENT, []))
    assert standardize_mode(exp.distillation.standardize) == "phi_s"
    assert exp.distillation.teacher_drop_prob > 0 and len(exp.teachers) == 3
    assert len(exp.data.img_sizes) == 4 and max(exp.data.img_sizes) == exp.data.img_size
    summaries = [e for e in exp.distillation.losses.values() if e.get("type") == "summary_distill"]
    assert len(summaries) >= 2
