"""The anchor fit: on boxes the paper's anchors cover badly it finds anchors (same count) that cover them,
its before/after figures are the coverage the model's matcher gives, its ``--set`` line gives those
anchors, and the tune space centred on it searches around them."""

from __future__ import annotations

import pytest

from engine.anchor_coverage import dataset_coverage
from engine.anchor_fit import Anchors, candidates, centred_ratios, fit_anchors
from engine.config import apply_overrides
from engine.recipes import get_recipe
from engine.spaces import centre_on_fit, resolve
from model.config import RetinaNetConfig

CFG = RetinaNetConfig(num_classes=1)


def _tall_boxes() -> dict:
    """16 images of 256 px, each with boxes of h / w = 5 (far outside the ratios 0.5..2) of 20 x 100 px."""
    images = [{"id": i, "width": 256, "height": 256} for i in range(1, 17)]
    anns = [{"image_id": i, "category_id": 1, "bbox": [x, 60.0 + i, 20.0, 100.0], "iscrowd": 0}
            for i in range(1, 17) for x in (10.0 + i, 120.0 + 2 * i)]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "pole"}]}


def test_the_fit_covers_boxes_the_paper_anchors_miss_at_the_same_anchor_count() -> None:
    gt = _tall_boxes()
    fit = fit_anchors(gt, CFG, eval_size=256, max_size=256, max_images=8)
    assert fit.before == dataset_coverage(gt, CFG, 256, 256).shares()
    assert fit.before["fg"] < 0.5  # best IoU of a 1:5 box with 1:2 anchors is under 0.5
    assert fit.after["fg"] == 1.0 and fit.after["below_bg"] == 0.0
    assert len(fit.fitted.scales) == 3 and len(fit.fitted.ratios) == 3 and len(fit.fitted.sizes) == 5
    assert max(fit.fitted.ratios) > 2.0  # taller anchors than the paper's, towards the boxes' 5
    cfg = apply_overrides(get_recipe("demo"), fit.fitted.overrides())
    assert (cfg.model.anchor_sizes, cfg.model.anchor_scales, cfg.model.anchor_ratios) == (
        fit.fitted.sizes, fit.fitted.scales, fit.fitted.ratios)  # fmt: skip
    refit = dataset_coverage(gt, fit.fitted.applied(CFG), 256, 256).shares()
    assert refit == fit.after
    assert fit.set_line().startswith("--set model.anchor_sizes=[")


def test_the_fit_never_reports_worse_coverage_than_it_started_from() -> None:
    gt = {"images": [{"id": 1, "width": 256, "height": 256}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [96.0, 96.0, 64.0, 64.0]}]}  # fmt: skip
    fit = fit_anchors(gt, CFG, eval_size=256, max_size=256)
    assert fit.before["fg"] == 1.0 and fit.after["fg"] == 1.0  # a box on an anchor: the start is kept or tied


def test_candidates_keep_the_counts() -> None:
    start = Anchors.of(CFG)
    for family in ("sizes", "ratios", "scales"):
        for c in candidates(start, family, median_ratio=3.0):
            assert (len(c.sizes), len(c.scales), len(c.ratios)) == (5, 3, 3)
    assert centred_ratios((0.5, 1.0, 2.0), 2.0) == pytest.approx((0.25, 1.0, 4.0))
    assert centred_ratios((2.0,), 0.7) == (1.4,)


def test_the_anchor_space_centres_on_a_doctor_report() -> None:
    report = {"fit": {"set": ["model.anchor_sizes=[20.0,40.0,80.0,160.0,320.0]", "model.anchor_ratios=[1.0,2.0,4.0]"]}}
    space, overrides = centre_on_fit("focal+anchors", ["model.focal_gamma=1.0"], report, "r.json")
    assert space == "focal+anchors_around" and overrides[-1] == "model.focal_gamma=1.0"
    cfg = apply_overrides(get_recipe("demo"), overrides)
    params = {p.key: p.values for p in resolve(space, cfg)}
    sizes = params["model.anchor_sizes"]
    assert (20.0, 40.0, 80.0, 160.0, 320.0) in sizes and len(sizes) == 3
    assert min(s[0] for s in sizes) < 20.0 < max(s[0] for s in sizes)
    assert (1.0, 2.0, 4.0) in params["model.anchor_ratios"] and len(params["model.anchor_ratios"]) == 3
    with pytest.raises(ValueError, match="holds no anchor fit"):
        centre_on_fit("anchors", [], {"images": 3}, "r.json")
