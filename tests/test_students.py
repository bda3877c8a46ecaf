"""The student zoo: gradients reach every parameter, two offline-distillation steps on coco128 run
for each student, and the selective scan of the Mamba student matches a naive recurrence (and,
on a CUDA machine with mamba-ssm, the fused kernel). Declared dims/strides against outputs are
checked for every variant by tests/test_backbones.py."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vfmkd.models  # noqa: F401  (registers the built-in components)
from vfmkd.core.config import load_experiment
from vfmkd.core.registry import BACKBONES
from vfmkd.engine.training.trainer import Trainer
from vfmkd.models.backbones import selective_scan as ss

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import prepare_features as ptf  # noqa: E402

EXPERIMENT = REPO / "configs" / "experiments" / "yolov8_sam_coco128.yaml"
TEACHER_SIZE, LIMIT = 128, 4

# One small variant of each student: (registry name, its config file).
STUDENTS = [("vit", "vit_tiny"), ("repvit", "repvit_m0_9"), ("regnet", "regnetx_002"), ("mamba", "mamba_tiny")]


def build_from_config(config: str):
    import yaml

    entry = yaml.safe_load((REPO / "configs" / "backbones" / f"{config}.yaml").read_text())
    return BACKBONES.build(entry.pop("type"), **entry)


@pytest.mark.parametrize("name, config", STUDENTS, ids=[c for _, c in STUDENTS])
def test_gradients_reach_every_parameter(name, config):
    torch.manual_seed(0)
    model = build_from_config(config).train()
    out = model(torch.rand(2, 3, 64, 96))
    assert [s.name for s in model.feature_specs()] == list(out) == ["P3", "P4", "P5"]
    sum(f.sum() for f in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient for {bad}"


@pytest.mark.parametrize("hw", [(100, 90), (224, 160), (32, 48)])
def test_vit_pyramid_handles_any_input_size(hw):
    model = BACKBONES.build("vit", variant="tiny", img_size=224, out_channels=32, strides=[4, 8, 16, 32]).eval()
    h, w = hw
    with torch.no_grad():
        out = model(torch.rand(1, 3, h, w))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        f"P{int(np.log2(s))}": (h // s, w // s) for s in (4, 8, 16, 32)
    }


# --- two offline-distillation steps per student on coco128 -------------------------------------

@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "sam"
    args = ["--teacher", "sam", "--splits", "train2017", "--limit", str(LIMIT), "--batch-size", "4",
            "--output", str(out), "--no-progress", "teacher.init=random", f"teacher.input_size={TEACHER_SIZE}"]
    assert ptf.main(args) == 0
    return out


@pytest.mark.parametrize("name, config", STUDENTS, ids=[c for _, c in STUDENTS])
def test_two_offline_distillation_steps(name, config, features, tmp_path):
    cfg = load_experiment(EXPERIMENT, [
        f"model.backbone.type={name}", f"model.backbone.config=configs/backbones/{config}.yaml",
        f"teachers.sam.feature_path={features}", "teachers.sam.init=random", f"teachers.sam.input_size={TEACHER_SIZE}",
        f"data.limit={LIMIT}", "data.batch_size=2", "data.img_size=128", "data.num_workers=0",
        "train.epochs=1", "train.device=cpu", "train.warmup_iters=1", f"work_dir={tmp_path}",
    ])
    trainer = Trainer(cfg, progress=False)
    assert trainer.model.backbone.get_feature_strides() == {"P3": 8, "P4": 16, "P5": 32}
    before = {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters()}
    logs = trainer.train_one_epoch(1)
    assert trainer.step == 2
    assert {"loss", "loss_det", "loss_feat_distill_sam", "cos_sam"} <= set(logs)
    assert all(np.isfinite(v) for v in logs.values()), logs
    changed = sum(not torch.equal(before[n], p) for n, p in trainer.model.backbone.named_parameters())
    assert changed > 0.9 * len(before), f"{name}: only {changed}/{len(before)} backbone tensors were updated"


# --- the selective scan -------------------------------------------------------------------------

def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One step at a time, straight from the recurrence (selective_scan_ref's maths)."""
    u, delta = u.double(), delta.double()
    A, B, C = A.double(), B.double(), C.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(L):
        Bt = (
            B
            if B.dim() == 2
            else B[:, None, :, t]
            if B.dim() == 3
            else B[..., t].repeat_interleave(dim // B.shape[1], 1)
        )
        Ct = (
            C
            if C.dim() == 2
            else C[:, None, :, t]
            if C.dim() == 3
            else C[..., t].repeat_interleave(dim // C.shape[1], 1)
        )
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bt * u[:, :, t, None]
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


def scan_inputs(layout: str, batch=2, dim=8, L=45, n=4, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc_shape = {"grouped": (batch, groups, n, L), "shared": (batch, n, L), "constant": (dim, n)}[layout]
    return dict(u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5, A=-torch.exp(r(dim, n)), B=r(*bc_shape),
                C=r(*bc_shape), D=r(dim), z=r(batch, dim, L), delta_bias=r(dim) * 0.5, delta_softplus=True)


@pytest.mark.parametrize("layout", ["grouped", "shared", "constant"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 45, 64])
def test_pure_scan_matches_naive_recurrence(layout, chunk_size):
    args = scan_inputs(layout)
    expected = naive_selective_scan(**args)
    got = ss.selective_scan_torch(**args, chunk_size=chunk_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_pure_scan_gradients_match_naive_recurrence():
    args = scan_inputs("grouped", L=30)
    leaves = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    grads = []
    for fn in (lambda **a: ss.selective_scan_torch(**a, chunk_size=4), naive_selective_scan):
        inputs = {k: (v.clone().requires_grad_(True) if k in leaves else v) for k, v in args.items()}
        fn(**inputs).sum().backward()
        grads.append([inputs[k].grad.double() for k in leaves])
    for name, got, expected in zip(leaves, *grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)


def test_scan_logs_its_path_once(caplog):
    ss._LOGGED.clear()
    args = scan_inputs("grouped", L=8)
    with caplog.at_level(logging.INFO, logger="vfmkd"):
        ss.selective_scan(**args)
        ss.selective_scan(**args)
    messages = [r.getMessage() for r in caplog.records if "selective scan" in r.getMessage()]
    assert messages == ["selective scan: pure-PyTorch chunked scan (tensors on CPU)"]


@pytest.mark.parametrize("k", [2, 4])
def test_cross_scan_orders_merge_back_onto_the_grid(k):
    from vfmkd.models.backbones.mamba import cross_merge, cross_scan

    x = torch.randn(2, 3, 5, 7)
    xs = cross_scan(x, k)
    assert xs.shape == (2, k, 3, 35)
    torch.testing.assert_close(cross_merge(xs, 5, 7), k * x.flatten(2))
    if k == 4:  # the second order reads column by column
        torch.testing.assert_close(xs[:, 1, :, :5], x[:, :, :, 0])


@pytest.mark.gpu
def test_mamba_ssm_kernel_matches_pure_scan():
    pytest.importorskip("mamba_ssm", reason="mamba-ssm not installed (pip install -e '.[mamba]')")
    assert ss.mamba_ssm_available()
    for layout in ("grouped", "shared"):
        args = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in scan_inputs(layout, dim=64, L=500, n=16).items()}
        leaves = ("u", "delta", "B", "C", "D")
        outs, grads = [], []
        for force in (False, True):
            inputs = {k: (v.clone().requires_grad_(True) if k in leaves else v) for k, v in args.items()}
            out = ss.selective_scan(**inputs, force_torch=force)
            out.backward(torch.ones_like(out))
            outs.append(out.detach())
            grads.append([inputs[k].grad for k in leaves])
        kernel, pure = outs
        assert ((kernel - pure).norm() / pure.norm()).item() < 1e-3, layout
        for name, gk, gp in zip(leaves, *grads):
            assert ((gk - gp).norm() / gp.norm()).item() < 5e-3, f"{layout}: grad of {name}"


@pytest.mark.gpu
def test_mamba_backbone_trains_on_cuda():
    model = BACKBONES.build("mamba", variant="tiny").cuda().train()
    out = model(torch.rand(2, 3, 96, 128, device="cuda"))
    sum(f.float().sum() for f in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
