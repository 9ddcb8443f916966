"""Anchor coverage against hand-computed cases: boxes centred where every FPN level has an anchor centre,
so that the best IoU is the best centred overlap of the box with the 45 anchor shapes (worked out here
from the paper's sizes, scales and ratios, not with the model's anchor generator)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.anchor_coverage import dataset_coverage, image_coverage
from model.config import RetinaNetConfig

CFG = RetinaNetConfig(num_classes=2)
CENTRE = 128.0  # on a 256 x 256 image every level (strides 8..128) has an anchor centred here


def _shapes() -> list[tuple[float, float, int]]:
    out = []
    for level, size in zip(range(3, 8), CFG.anchor_sizes, strict=True):
        for ratio in CFG.anchor_ratios:
            for scale in CFG.anchor_scales:
                side = size * scale
                out.append((side / math.sqrt(ratio), side * math.sqrt(ratio), level))
    return out


def _centred_iou(w: float, h: float, aw: float, ah: float) -> float:
    inter = min(w, aw) * min(h, ah)
    return inter / (w * h + aw * ah - inter)


def _box(w: float, h: float) -> list[float]:
    return [CENTRE - w / 2, CENTRE - h / 2, CENTRE + w / 2, CENTRE + h / 2]


@pytest.mark.parametrize(
    ("w", "h", "kind"),
    [
        (64.0, 64.0, "fg"),  # exactly the P4 anchor of scale 1, ratio 1: IoU 1
        (64.0 * 2 ** (1 / 6), 64.0 * 2 ** (1 / 6), "fg"),  # between two scales: IoU 2**(-1/3) = 0.79
        (24.0, 192.0, "low_quality"),  # 1:8, thinner than any anchor: best IoU under 0.5
        (10.0, 10.0, "low_quality"),  # smaller than the smallest anchor (32): IoU 0.098
    ],
)
def test_best_iou_level_and_kind_match_the_hand_computed_case(w: float, h: float, kind: str) -> None:
    (fit,) = image_coverage(torch.tensor([_box(w, h)]), (256, 256), CFG)
    best = max(_shapes(), key=lambda s: _centred_iou(w, h, s[0], s[1]))
    assert fit.best_iou == pytest.approx(_centred_iou(w, h, best[0], best[1]), abs=1e-5)
    assert fit.level == best[2] and fit.kind == kind


def test_a_duplicate_box_is_unmatched() -> None:
    """Two identical boxes: the matcher gives every anchor to one box (the first of equal IoUs), so the
    duplicate never gets an anchor: the loss never learns from it."""
    exact, duplicate = image_coverage(torch.tensor([_box(64, 64), _box(64, 64)]), (256, 256), CFG)
    assert exact.kind == "fg" and exact.best_iou == pytest.approx(1.0)
    assert duplicate.kind == "unmatched" and duplicate.best_iou == pytest.approx(1.0)


def test_dataset_report_counts_per_class_and_level_after_the_eval_resize() -> None:
    gt = {"images": [{"id": 1, "width": 128, "height": 128}],
          "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
          "annotations": [{"image_id": 1, "category_id": 3, "bbox": [32, 32, 64, 64], "iscrowd": 0},  # 128 px at 2x
                          {"image_id": 1, "category_id": 7, "bbox": [60, 60, 5, 5], "iscrowd": 0},
                          {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1}]}  # fmt: skip
    report = dataset_coverage(gt, CFG, eval_size=256, max_size=512).report({0: "a", 1: "b"})
    assert report["overall"]["boxes"] == 2  # the crowd box is left out, as in training
    assert report["per_class"]["a"]["fg"] == 1.0 and report["per_level"]["P5"]["boxes"] == 1
    assert report["per_class"]["b"]["below_bg"] == 1.0


def test_the_doctor_reports_coco128_and_names_a_missing_dataset(coco128, tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[2]
    annotations, images = coco128 / "annotations" / "instances_train2017.json", coco128 / "images" / "train2017"
    convert = [sys.executable, "jobs/convert.py", "--annotations", str(annotations), "--images", str(images),
               "--output", str(tmp_path / "c128"), "--no-progress"]  # fmt: skip
    subprocess.run(convert, cwd=root, check=True, capture_output=True, timeout=300)
    # The demo recipe's small eval resize keeps the fit quick; the figures are checked for consistency only.
    doctor = [sys.executable, "jobs/doctor.py", "--data", str(tmp_path / "c128"), "--out", str(tmp_path / "doc"),
              "--recipe", "demo",
              "--fit-images", "6", "--json", str(tmp_path / "r.json")]  # fmt: skip
    done = subprocess.run(doctor, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((tmp_path / "doc" / "report.json").read_text())
    assert report["images"] == 128 and report["boxes"] == sum(report["boxes_per_class"].values())
    assert 0 < report["border_boxes"] < report["boxes"] and report["sizes"]["image_width"][-1] == 640
    overall = report["coverage"]["overall"]
    assert overall["boxes"] == report["boxes"]
    assert overall["fg"] + overall["low_quality"] + overall["unmatched"] == pytest.approx(1.0)
    assert sum(s["boxes"] for s in report["coverage"]["per_level"].values()) == report["boxes"]
    fit = report["fit"]
    assert fit["before"] == overall and fit["after"]["fg"] >= fit["before"]["fg"] and fit["anchors_per_location"] == 9
    assert fit["set_line"] in done.stdout and "anchor coverage:" in done.stdout and "person" in done.stdout
    for name in ("sizes.png", "anchors.png"):
        with Image.open(tmp_path / "doc" / name) as im:
            assert im.format == "PNG" and im.width > 400
    missing = subprocess.run(
        [*doctor[:3], str(tmp_path / "nope")], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "error: no manifest.json" in missing.stderr and "Traceback" not in missing.stderr
