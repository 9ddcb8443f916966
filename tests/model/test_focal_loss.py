"""Focal loss against its formula, torchvision's implementation, and alpha-balanced CE at gamma = 0."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import model
from model.focal import focal_loss_terms, negative_focal_sum


def _formula(x: float, target: int, alpha: float, gamma: float) -> float:
    one_minus_p_t = 1 / (1 + math.exp(x)) if target == 1 else 1 / (1 + math.exp(-x))  # 1 - p_t, no cancellation
    alpha_t = alpha if target == 1 else 1 - alpha
    log_p_t = -math.log1p(math.exp(-x)) if target == 1 else -math.log1p(math.exp(x))  # log(p_t), no cancellation
    return -alpha_t * one_minus_p_t**gamma * log_p_t


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_terms_equal_formula_and_torchvision(gamma: float) -> None:
    x = torch.tensor([-30.0, -4.0, -0.5, 0.0, 0.7, 3.0, 25.0], dtype=torch.float64)
    neg, pos = focal_loss_terms(x, 0.25, gamma)
    for i, v in enumerate(x.tolist()):
        assert math.isclose(neg[i].item(), _formula(v, 0, 0.25, gamma), rel_tol=1e-9, abs_tol=1e-300)
        assert math.isclose(pos[i].item(), _formula(v, 1, 0.25, gamma), rel_tol=1e-9, abs_tol=1e-300)
    for target, ours in ((0, neg), (1, pos)):
        tv = sigmoid_focal_loss(x, torch.full_like(x, float(target)), alpha=0.25, gamma=gamma)
        torch.testing.assert_close(ours, tv)


def test_gamma_zero_is_alpha_balanced_cross_entropy() -> None:
    x = torch.randn(100, dtype=torch.float64)
    neg, pos = focal_loss_terms(x, 0.25, 0.0)
    torch.testing.assert_close(pos, 0.25 * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none"))
    torch.testing.assert_close(neg, 0.75 * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none"))


def _one_anchor_outputs(logits: list[float], delta: list[float]) -> dict:
    """One image, two anchors: anchor 0 equals the box, anchor 1 is far away."""
    return {
        "cls_logits": torch.tensor([[logits, [-2.0] * len(logits)]]),
        "bbox_deltas": torch.tensor([[delta, [0.0] * 4]]),
        "anchors": torch.tensor([[0.0, 0.0, 32.0, 32.0], [200.0, 200.0, 232.0, 232.0]]),
        "num_anchors_per_level": [2],
        "image_size": (256, 256),
    }


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_loss_by_hand_one_foreground_anchor(gamma: float) -> None:
    cfg = model.RetinaNetConfig(num_classes=3, focal_gamma=gamma, box_loss="smooth_l1", smooth_l1_beta=0.1)
    loss_fn = model.RetinaNetLoss.from_config(cfg)
    out = _one_anchor_outputs([0.5, -1.0, 2.0], [0.05, -0.3, 0.0, 0.0])
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 32.0]]), "labels": torch.tensor([1])}]
    got = loss_fn(out, targets)
    cls = sum(_formula(x, int(k == 1), 0.25, gamma) for k, x in enumerate([0.5, -1.0, 2.0]))
    cls += 3 * _formula(-2.0, 0, 0.25, gamma)
    box = 0.5 * 0.05**2 / 0.1 + (0.3 - 0.05)  # smooth L1: quadratic below beta, linear above
    assert got["num_foreground"].item() == 1
    assert math.isclose(got["loss_cls"].item(), cls, rel_tol=1e-5)
    assert math.isclose(got["loss_box"].item(), box, rel_tol=1e-5)


def test_image_without_boxes_has_only_negatives() -> None:
    loss_fn = model.RetinaNetLoss.from_config(model.RetinaNetConfig(num_classes=3))
    out = _one_anchor_outputs([0.5, -1.0, 2.0], [0.0] * 4)
    got = loss_fn(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    expected = sum(_formula(x, 0, 0.25, 2.0) for x in [0.5, -1.0, 2.0, -2.0, -2.0, -2.0])
    assert got["num_foreground"].item() == 0 and got["loss_box"].item() == 0
    assert math.isclose(got["loss_cls"].item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["l1", "giou"])
def test_box_loss_options(kind: str) -> None:
    loss_fn = model.RetinaNetLoss.from_config(model.RetinaNetConfig(num_classes=3, box_loss=kind))
    out = _one_anchor_outputs([0.0] * 3, [0.0] * 4)  # predicted box = anchor 0
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 32.0, 28.0]]), "labels": torch.tensor([0])}]
    got = loss_fn(out, targets)["loss_box"].item()
    expected = abs(math.log(28 / 32)) + abs(-2 / 32) if kind == "l1" else 1 - 28 / 32  # dy = (14 - 16) / 32
    assert math.isclose(got, expected, rel_tol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 1.5, 2.0])
def test_fused_negative_sum_matches_autograd_of_the_formula(gamma: float) -> None:
    """Values and gradients of the chunked function equal plain autograd, with large |x| and many chunks."""
    x = (torch.randn(3, 5000, 7, dtype=torch.float64) * 6).requires_grad_()
    x.data[0, :5, 0] = torch.tensor([-200.0, -30.0, 14.9, 15.1, 120.0], dtype=torch.float64)
    ref = focal_loss_terms(x, 0.25, gamma)[0].sum(-1)
    got = negative_focal_sum(x, 0.25, gamma)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)
    w = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-9)
