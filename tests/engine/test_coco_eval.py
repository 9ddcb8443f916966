from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from engine.coco_eval import (
    METRIC_NAMES,
    coco_evaluate,
    coco_evaluate_with_summary,
    detections_to_coco,
    format_metrics_table,
    merge_results,
)

# Categories with non-contiguous ids (as COCO's), boxes of every size range: small < 32², medium, large > 96².
BOXES = {
    1: [(10, 10, 20, 20, 3), (50, 60, 60, 40, 7), (200, 100, 150, 120, 3)],
    2: [(5, 5, 200, 150, 12), (300, 200, 25, 25, 7)],
    3: [(100, 100, 80, 60, 3), (20, 240, 40, 50, 12), (250, 30, 15, 18, 7), (400, 300, 200, 170, 3)],
}


def ground_truth() -> dict:
    annotations = [
        {"id": n, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        for n, (image_id, (x, y, w, h, c)) in enumerate(
            ((i, box) for i, boxes in BOXES.items() for box in boxes), start=1
        )
    ]
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in BOXES],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in (3, 7, 12)],
    }


def perfect_results(shift: float = 0.0) -> list[dict]:
    return [
        {"image_id": i, "category_id": c, "bbox": [x + shift * w, y, w, h], "score": 1.0}
        for i, boxes in BOXES.items()
        for (x, y, w, h, c) in boxes
    ]


def test_perfect_detections_score_one() -> None:
    metrics = coco_evaluate(ground_truth(), perfect_results())
    names = ("class3", "class7", "class12")
    assert list(metrics) == [*METRIC_NAMES, *(f"{k}/{n}" for n in names for k in ("AP", "AP50")),
                             *(f"{k}/{n}" for n in names for k in ("gt", "P50", "R50"))]  # fmt: skip
    assert all(metrics[f"AP/{n}"] == pytest.approx(1.0) and metrics[f"R50/{n}"] == 1.0 for n in names)
    assert (metrics["gt/class3"], metrics["gt/class7"], metrics["gt/class12"]) == (4.0, 3.0, 2.0)
    for name in METRIC_NAMES:
        if name != "AR1":  # AR1 allows one detection per image: images 1 and 3 have several boxes of class 3
            assert metrics[name] == pytest.approx(1.0), name
    assert 0.5 < metrics["AR1"] < 1.0


def test_shifted_boxes_pass_iou_half_not_three_quarters() -> None:
    # Shift by 20 % of the width: IoU = 0.8 / 1.2 = 0.667, between 0.5 and 0.75.
    metrics = coco_evaluate(ground_truth(), perfect_results(shift=0.2))
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert 0.0 < metrics["AP"] < 1.0


def test_empty_results_give_zeros() -> None:
    metrics, summary = coco_evaluate_with_summary(ground_truth(), [])
    assert {k: v for k, v in metrics.items() if k in METRIC_NAMES} == {name: 0.0 for name in METRIC_NAMES}
    assert metrics["AP/class3"] == 0.0 and metrics["AP50/class12"] == 0.0
    assert "Average Precision" in summary


def test_empty_results_keep_minus_one_where_no_objects() -> None:
    truth = ground_truth()
    truth["annotations"] = [a for a in truth["annotations"] if a["area"] > 32**2]  # no small objects
    metrics = coco_evaluate(truth, [])
    assert metrics["APs"] == -1.0
    assert metrics["AP"] == 0.0


def test_subset_of_images_is_respected() -> None:
    # Perfect on image 1, nothing on images 2 and 3: perfect when only image 1 is evaluated.
    results = [r for r in perfect_results() if r["image_id"] == 1]
    assert coco_evaluate(ground_truth(), results, image_ids=[1])["AP"] == pytest.approx(1.0)
    assert coco_evaluate(ground_truth(), results)["AP"] < 1.0


def test_inputs_are_not_modified() -> None:
    truth, results = ground_truth(), perfect_results()
    before = json.dumps([truth, results], sort_keys=True)
    coco_evaluate(truth, results)
    assert json.dumps([truth, results], sort_keys=True) == before


def test_unknown_image_ids_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(ground_truth(), [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_detections_to_coco_converts_boxes_and_labels() -> None:
    dets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.5, 4.0]]),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([2, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    records = detections_to_coco([42, 43], dets, category_ids=[3, 7, 12])
    assert records == [
        {"image_id": 42, "category_id": 12, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 5.5, 4.0], "score": pytest.approx(0.25)},
    ]
    assert isinstance(records[0]["bbox"][0], float)
    with pytest.raises(ValueError, match="outside"):
        detections_to_coco([1], [{**dets[0], "labels": torch.tensor([3, 0])}], category_ids=[3, 7, 12])


def test_merge_results_deduplicates_by_image() -> None:
    a = {"image_id": 2, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.5}
    b = {"image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 2.0, 2.0], "score": 0.9}
    c = {"image_id": 1, "category_id": 7, "bbox": [1.0, 0.0, 2.0, 2.0], "score": 0.95}
    again = {"image_id": 2, "category_id": 7, "bbox": [5.0, 5.0, 1.0, 1.0], "score": 0.7}  # image 2 on rank 1 too
    merged = merge_results(
        [[a, b, c, a], [again, {"image_id": 3, **{k: a[k] for k in ("category_id", "bbox")}, "score": 0.1}]]
    )
    assert [(r["image_id"], r["score"]) for r in merged] == [(1, 0.95), (1, 0.9), (2, 0.5), (3, 0.1)]


def test_format_metrics_table() -> None:
    metrics = {name: 0.1 * i for i, name in enumerate(METRIC_NAMES)} | {"APs": -1.0, "step": 100}
    table = format_metrics_table(metrics)
    for name in METRIC_NAMES:
        assert name in table
    assert "n/a" in table and "0.8000" in table and "step" not in table


def test_matches_pycocotools_on_coco128(coco128, tmp_path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_path = coco128 / "annotations" / "instances_train2017.json"
    truth = json.loads(gt_path.read_text())
    # Imperfect detections: jittered ground truth boxes with varied scores, some dropped, some category swaps.
    generator = torch.Generator().manual_seed(0)
    category_ids = [c["id"] for c in truth["categories"]]
    results = []
    for n, ann in enumerate(truth["annotations"]):
        if n % 7 == 0:
            continue
        x, y, w, h = ann["bbox"]
        jitter = (torch.rand(4, generator=generator) - 0.5) * 0.3
        category = ann["category_id"] if n % 11 else category_ids[(category_ids.index(ann["category_id"]) + 1) % 80]
        box = [
            x + jitter[0].item() * w,
            y + jitter[1].item() * h,
            w * (1 + jitter[2].item()),
            h * (1 + jitter[3].item()),
        ]
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": category,
                "bbox": box,
                "score": float(torch.rand(1, generator=generator)),
            }
        )
    subset = sorted({image["id"] for image in truth["images"]})[:100]

    ours = coco_evaluate(truth, results, image_ids=subset)

    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(results_path))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = subset
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = dict(zip(METRIC_NAMES, (float(s) for s in evaluator.stats), strict=False))
    assert {k: ours[k] for k in METRIC_NAMES} == expected
    assert 0.1 < ours["AP"] < 0.9 and not math.isnan(ours["AP"])
    # Per class: the same as pycocotools evaluating that one class alone (its own AP, summarised).
    names = {c["id"]: c["name"] for c in truth["categories"]}
    for cat in (1, 3, 62):
        with contextlib.redirect_stdout(io.StringIO()):
            alone = COCOeval(coco_gt, coco_dt, "bbox")
            alone.params.imgIds, alone.params.catIds = subset, [cat]
            alone.evaluate()
            alone.accumulate()
            alone.summarize()
        assert ours[f"AP/{names[cat]}"] == pytest.approx(alone.stats[0], abs=1e-12), names[cat]
        assert ours[f"AP50/{names[cat]}"] == pytest.approx(alone.stats[1], abs=1e-12), names[cat]


def test_per_class_figures_and_the_best_f1_operating_point_by_hand() -> None:
    """class7 has 3 boxes; its detections: a hit at 0.9, a miss at 0.8, a hit at 0.6, a miss at 0.5, a hit at 0.3.
    Interpolated precision at IoU 0.5: 1 up to recall 1/3, 2/3 up to 2/3, 3/5 up to 1. F1 at those ends:
    0.5, 0.667, 0.75: the best is at recall 1, reached by the detection of score 0.3."""
    from engine.coco_eval import coco_evaluate_full
    from engine.per_class import format_table, thresholds

    truth = ground_truth()
    hits = [r for r in perfect_results() if r["category_id"] == 7]  # (1, 50, 60), (2, 300, 200), (3, 250, 30)
    for r, score in zip(hits, (0.9, 0.6, 0.3), strict=True):
        r["score"] = score
    misses = [{"image_id": 1, "category_id": 7, "bbox": [500.0, 400.0, 30.0, 30.0], "score": s} for s in (0.8, 0.5)]
    others = [r for r in perfect_results() if r["category_id"] != 7]
    result = coco_evaluate_full(truth, [*hits, *misses, *others])
    c7 = next(c for c in result.classes if c.name == "class7")
    assert c7.gt == 3 and c7.category_id == 7
    # 101 recall points: 0..0.33 (34 points) at 1, 0.34..0.66 (33) at 2/3, 0.67..1 (34) at 3/5.
    assert c7.AP50 == pytest.approx((34 * 1.0 + 33 * 2 / 3 + 34 * 3 / 5) / 101)
    assert c7.threshold == pytest.approx(0.3) and c7.recall == pytest.approx(1.0) and c7.precision == pytest.approx(0.6)
    assert c7.f1 == pytest.approx(0.75)
    assert result.metrics["AP50/class7"] == c7.AP50 and result.metrics["AP/class3"] == pytest.approx(1.0)
    saved = thresholds(result.classes)["classes"]
    assert saved["class7"]["threshold"] == pytest.approx(0.3) and saved["class3"]["precision"] == pytest.approx(1.0)
    assert "class7" in format_table(result.classes)


def test_score_thresholds_auto_need_a_thresholds_file() -> None:
    from engine.inference import class_thresholds

    saved = {"classes": {"a": {"threshold": 0.4}, "b": {"threshold": 0.2}}}
    assert class_thresholds("auto", ["b", "a"], saved, "x").tolist() == pytest.approx([0.2, 0.4])
    assert class_thresholds("0.3", ["a", "b"], None, "x").tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match=r"has no thresholds\.json.*jobs/evaluate\.py .* --out DIR"):
        class_thresholds("auto", ["a"], None, "runs/x/checkpoint_00000010")
    with pytest.raises(ValueError, match="no threshold for c"):
        class_thresholds("auto", ["a", "c"], saved, "x")
    with pytest.raises(ValueError, match="give a number"):
        class_thresholds("high", ["a"], None, "x")
