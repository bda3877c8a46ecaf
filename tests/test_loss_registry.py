"""What the loss contract (tests/test_loss_contract.py: every registered loss built from its YAML entry,
its value against a hand-computed case, backward) does not cover: special parameter values
(smooth L1 at beta 0, FA pooling), invariances, logit layouts and mask shapes, exact KD gradients,
misspelt keys (did-you-mean ConfigError), invalid values and the alpha/beta/gamma weighting."""
from __future__ import annotations

import math

import pytest
import torch

from vfmkd.core.errors import ConfigError
from vfmkd.core.registry import LOSSES
from vfmkd.distillation.losses import (
    ClsDistillLoss,
    FeatureAffinityLoss,
    FeatureCosineLoss,
    FeatureSmoothL1Loss,
    KLDivergenceLoss,
    MaskDistillLoss,
)
from vfmkd.distillation.losses.affinity import pool_factor
from vfmkd.distillation.weighting import combine

FEAT = dict(teacher="sam", student_channels=4, teacher_channels=6)


def _feature_inputs(h=5, w=7):
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, h, w), torch.randn(2, 6, h, w)
    mask = torch.zeros(2, 1, h, w)
    mask[0, :, 1:4, 2:6] = 1
    mask[1, :, :, 3:] = 1
    return s, t, mask


def _masked_location_mean(per_loc, mask):
    """(B, H, W) per-location values -> their mean over mask == 1, by explicit selection."""
    return per_loc[mask[:, 0].bool()].mean()


def _manual_cos(a, t):
    return (a * t).sum(1) / (a.norm(dim=1) * t.norm(dim=1))


# ----------------------------------------------------------------------------- feature losses
def test_feature_smooth_l1_beta_zero_is_masked_l1():
    s, t, mask = _feature_inputs()
    loss = FeatureSmoothL1Loss(**FEAT, beta=0.0)
    value, _ = loss(s, t, mask)
    d = (loss.adapter(s) - t).abs()
    torch.testing.assert_close(value, _masked_location_mean(d.mean(1), mask))


def test_feature_cosine_is_scale_invariant_in_the_teacher():
    s, t, mask = _feature_inputs()
    loss = FeatureCosineLoss(**FEAT)
    value, cos = loss(s, t, mask)
    torch.testing.assert_close(value, 1 - cos)  # the loss is one minus the reported cosine
    torch.testing.assert_close(loss(s, 7.0 * t, mask)[0], value)


# ----------------------------------------------------------------------------- feature affinity
def _manual_fa(a, t, mask, k):
    """Pool by reshape, normalise, build S with explicit loops over location pairs."""
    b, _, h, w = a.shape
    hp, wp = h // k, w // k

    def pool(x):
        x = x[:, :, : hp * k, : wp * k]
        return x.reshape(x.shape[0], x.shape[1], hp, k, wp, k).mean(dim=(3, 5)).flatten(2)  # (B, C, N)

    pa, pt, pm = pool(a), pool(t), pool(mask)[:, 0]
    n = hp * wp
    total, count = 0.0, 0
    for bi in range(b):
        va = [pa[bi, :, i] / pa[bi, :, i].norm() for i in range(n)]
        vt = [pt[bi, :, i] / pt[bi, :, i].norm() for i in range(n)]
        for i in range(n):
            for j in range(n):
                if pm[bi, i] > 0.5 and pm[bi, j] > 0.5:
                    total += float((va[i] @ va[j] - vt[i] @ vt[j]).abs())
                    count += 1
    return total / count


def test_feature_affinity_against_loops():
    s, t, mask = _feature_inputs(h=9, w=13)
    loss = FeatureAffinityLoss(**FEAT, fa_subscale=0.5)
    value, cos = loss(s, t, mask)
    a = loss.adapter(s).detach()
    assert math.isclose(float(value.detach()), _manual_fa(a, t, mask, 2), rel_tol=1e-5)
    torch.testing.assert_close(cos, _masked_location_mean(_manual_cos(a, t), mask))
    # The integer-factor spelling is the same loss.
    same = FeatureAffinityLoss(**FEAT, fa_subscale=2)
    same.load_state_dict(loss.state_dict())
    torch.testing.assert_close(same(s, t, mask)[0], value)


def test_feature_affinity_matches_dsrl_for_one_full_image():
    torch.manual_seed(1)
    s, t = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 8, 8)
    loss = FeatureAffinityLoss(**FEAT, fa_subscale=0.25)
    value, _ = loss(s, t, torch.ones(1, 1, 8, 8))
    # DSRL's FALoss: AvgPool2d, divide by the L2 norm, bmm, L1 norm / (hw)^2.
    def mat(x):
        x = torch.nn.AvgPool2d(4)(x).flatten(2)
        x = x / x.norm(2, 1, keepdim=True)
        return torch.bmm(x.permute(0, 2, 1), x)
    dsrl = torch.norm(mat(t) - mat(loss.adapter(s)), 1) / (2 * 2) ** 2
    torch.testing.assert_close(value, dsrl)


def test_feature_affinity_factor_rules():
    assert pool_factor(0.125) == pool_factor(8) == 8
    assert pool_factor(1) == pool_factor(1.0) == 1
    for bad in (0.3, 2.5, 0, -4):
        with pytest.raises(ConfigError):
            pool_factor(bad)
    with pytest.raises(ValueError, match="leaves no location"):
        FeatureAffinityLoss(**FEAT, fa_subscale=8)(torch.randn(1, 4, 4, 16), torch.randn(1, 6, 4, 16),
                                                   torch.ones(1, 1, 4, 16))


# ----------------------------------------------------------------------------- logit distillation
def _manual_softmax_kl(s, t, temp, dim):
    p_s, p_t = torch.softmax(s / temp, dim), torch.softmax(t / temp, dim)
    return (p_t * (p_t.log() - p_s.log())).sum(dim)


def _manual_binary_kl(s, t, temp):
    p, q = torch.sigmoid(t / temp), torch.sigmoid(s / temp)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def test_kl_divergence_gradient_is_t_times_probability_gap():
    torch.manual_seed(2)
    s = torch.randn(6, 10, requires_grad=True)
    t = torch.randn(6, 10)
    temp = 3.0
    KLDivergenceLoss(temperature=temp)(s, t).backward()
    # d/ds of T^2 * KL(p_t || softmax(s/T)) / N is T * (p_s - p_t) / N: the T^2 factor is there.
    expected = temp * (torch.softmax(s / temp, 1) - torch.softmax(t / temp, 1)) / s.shape[0]
    torch.testing.assert_close(s.grad, expected.detach())
    assert float(KLDivergenceLoss()(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cls_distill_layouts_and_bool_mask(mode):
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11) * 3  # (B, K, A) as ultralytics' scores
    anchors = torch.rand(2, 11) > 0.4
    temp = 2.0
    loss = ClsDistillLoss(temperature=temp, mode=mode)
    if mode == "sigmoid":
        per_anchor = _manual_binary_kl(s, t, temp).sum(1)
    else:
        per_anchor = _manual_softmax_kl(s, t, temp, 1)
    torch.testing.assert_close(loss(s, t), per_anchor.mean() * temp ** 2)
    torch.testing.assert_close(loss(s, t, anchors), per_anchor[anchors].mean() * temp ** 2)  # bool mask
    # (N, K) rows give the same value as the (B, K, A) layout.
    def rows(x):
        return x.permute(0, 2, 1).reshape(-1, 5)

    torch.testing.assert_close(loss(rows(s), rows(t), anchors.reshape(-1)), loss(s, t, anchors))
    torch.testing.assert_close(loss(s.permute(0, 2, 1), t.permute(0, 2, 1), anchors, class_dim=-1), loss(s, t, anchors))


def test_mask_distill_mask_shapes_and_extreme_logits():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8) * 4
    valid = torch.zeros(2, 1, 6, 8)
    valid[:, :, :4, :5] = 1
    temp = 1.5
    loss = MaskDistillLoss(temperature=temp)
    kl = _manual_binary_kl(s, t, temp)
    torch.testing.assert_close(loss(s, t), kl.mean() * temp ** 2)
    sel = valid.expand_as(kl).bool()
    torch.testing.assert_close(loss(s, t, valid), kl[sel].mean() * temp ** 2)
    slots = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 1, 1)  # padded prompt slot
    torch.testing.assert_close(loss(s, t, slots), kl[:, :2].mean() * temp ** 2)
    big = loss(torch.full((1, 1, 2, 2), -100.0), torch.full((1, 1, 2, 2), 100.0))
    assert torch.isfinite(big) and float(big) > 10
    with pytest.raises(ValueError, match="differ"):
        loss(s, t[:, :, :5])


# ----------------------------------------------------------------------------- weighting
def test_combine_alpha_beta_gamma():
    terms = {"det": torch.tensor(2.0), "kd": torch.tensor(3.0), "mask": torch.tensor(0.5), "feat": torch.tensor(5.0)}
    kinds = {"det": "task", "kd": "output", "mask": "output", "feat": "feature"}
    weights = {"det": 1.0, "kd": 0.5, "mask": 2.0, "feat": 0.1}
    plain = sum(weights[k] * float(v) for k, v in terms.items())
    assert float(combine(terms, kinds, weights, 1.0, 1.0, 1.0)) == pytest.approx(plain)
    got = combine(terms, kinds, weights, alpha=0.5, beta=2.0, gamma=10.0)
    assert float(got) == pytest.approx(0.5 * 2.0 + 2.0 * (0.5 * 3.0 + 2.0 * 0.5) + 10.0 * 0.1 * 5.0)
    assert float(combine(terms, kinds, {}, 1.0, 1.0, 1.0)) == pytest.approx(sum(float(v) for v in terms.values()))
    assert float(combine({}, {}, {}, 1.0, 1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="kind"):
        combine({"x": torch.tensor(1.0)}, {"x": "feat"}, {}, 1.0, 1.0, 1.0)
    # Gradients flow through the combination.
    x = torch.tensor(1.0, requires_grad=True)
    combine({"a": 3 * x}, {"a": "feature"}, {"a": 2.0}, 1.0, 1.0, 0.5).backward()
    assert float(x.grad) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- registry
BUILDS = [
    ("feature_smooth_l1", dict(FEAT, beta=0.5), "betta", "beta", "feature"),
    ("feature_cosine", dict(FEAT), "adapter_hiden", "adapter_hidden", "feature"),
    ("feature_affinity", dict(FEAT, fa_subscale=0.125), "fa_subscal", "fa_subscale", "feature"),
    ("kl_divergence", dict(temperature=4.0), "temprature", "temperature", "output"),
    ("cls_distill", dict(temperature=1.0, mode="softmax"), "mdoe", "mode", "output"),
    ("mask_distill", dict(temperature=2.0, teacher="sam"), "temperatur", "temperature", "output"),
]


@pytest.mark.parametrize("name,kwargs,typo,right,kind", BUILDS, ids=[b[0] for b in BUILDS])
def test_build_through_registry(name, kwargs, typo, right, kind):
    module = LOSSES.build(name, **kwargs)
    assert module.kind == kind
    bad = dict(kwargs)
    bad[typo] = bad.pop(right, 1.0)
    with pytest.raises(ConfigError, match=f"Did you mean '{right}'"):
        LOSSES.build(name, where="distillation.losses.x", **bad)


def test_log_names_and_invalid_values():
    assert ClsDistillLoss.log_name == "loss_cls_distill" and MaskDistillLoss.log_name == "loss_mask_distill"
    with pytest.raises(ConfigError, match="Did you mean 'softmax'"):
        LOSSES.build("cls_distill", mode="softmx")
    with pytest.raises(ConfigError):
        LOSSES.build("kl_divergence", temperature=0.0)
    with pytest.raises(ConfigError):
        LOSSES.build("feature_smooth_l1", **FEAT, beta=-1.0)
    with pytest.raises(ConfigError, match="must be float"):
        LOSSES.build("feature_affinity", **FEAT, fa_subscale="1/8")


# ----------------------------------------------------------------------------- building terms
def test_every_vfmkd_loss_builds_its_own_term():
    """build_loss_terms only looks the loss up and calls its hook: each registered loss class has one."""
    missing = [n for n in LOSSES.names() if LOSSES.get(n).__module__.startswith("vfmkd.")
               and not callable(getattr(LOSSES.get(n), "build_term", None))]
    assert not missing, f"losses without a build_term hook: {missing}"


def test_a_loss_without_a_hook_names_what_to_implement(monkeypatch):
    from vfmkd.engine.builders import build_loss_terms, build_model

    class Hookless(torch.nn.Module):
        kind = "output"

    monkeypatch.setitem(LOSSES._entries, "hookless", Hookless)
    model = build_model({"backbone": {"type": "yolov8", "variant": "n"}, "neck": {"type": "yolov8_pafpn", "depth": 1},
                         "heads": {"detection": {"type": "yolo_head", "num_classes": 80}}})
    with pytest.raises(ConfigError, match=r"distillation\.losses\.h: loss 'hookless' \(Hookless\) has no build_term "
                                          r"hook.*OutputDistillLoss.*build_term\(cls, entry: LossEntry"):
        build_loss_terms({"h": {"type": "hookless"}}, model, {}, {})


def test_the_pairing_registry_holds_the_documented_table():
    """(loss, teacher kind) -> the student head tasks it pairs: the table of
    vfmkd/distillation/pairing/output_rules.py (mask teachers; vfmkd teachers' heads)."""
    import vfmkd.teachers  # noqa: F401  (registers the teachers: the test passes run alone, too)
    from vfmkd.distillation.pairing.registry import HEADS, MASKS, mask_teacher_types, served_tasks

    assert {loss: set(served_tasks(loss, MASKS)) for loss in ("mask_distill", "kl_divergence", "cls_distill")} == {
        "mask_distill": {"instance", "semantic", "binary", "panoptic_query"},
        "kl_divergence": {"binary", "panoptic_query"}, "cls_distill": {"semantic", "binary"}}
    every = {"detection", "instance", "semantic", "binary"}
    assert {loss: set(served_tasks(loss, HEADS)) for loss in ("mask_distill", "kl_divergence", "cls_distill")} == {
        "mask_distill": {"instance", "semantic", "binary"}, "kl_divergence": every, "cls_distill": every}
    # the mask teachers are the TEACHERS registry's can_segment types, in registration order
    assert list(mask_teacher_types())[:3] == ["sam", "lora_sam", "sam2"]
