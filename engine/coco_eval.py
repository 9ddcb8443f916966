"""COCO box mAP with pycocotools, from detections in memory (no files).

Metric convention: values are pycocotools' own (0..1); ``-1.0`` means "no such ground truth objects in the
evaluated images" (e.g. ``APs`` when there are no small objects) and is kept as ``-1.0``, so the numbers are
exactly the ones pycocotools prints. ``format_metrics_table`` shows it as ``n/a``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.per_class import ClassResult, flat_metrics, per_class

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")  # COCOeval.stats[0:9]


@dataclass
class CocoResult:
    """``metrics``: ``METRIC_NAMES``, then ``AP/<class>`` and ``AP50/<class>``; ``summary``: pycocotools'
    table; ``classes``: per class AP, AP50, AP75, ground-truth count and best-F1 operating point."""

    metrics: dict[str, float]
    summary: str = ""
    classes: list[ClassResult] = field(default_factory=list)


def detections_to_coco(
    image_ids: Sequence[int], detections: Sequence[dict[str, torch.Tensor]], category_ids: Sequence[int]
) -> list[dict]:
    """Detections -> COCO results records.

    ``detections[i]`` belongs to image ``image_ids[i]`` and holds ``boxes`` ``[D, 4]`` xyxy in pixels of the
    original image, ``scores`` ``[D]`` and ``labels`` ``[D]`` contiguous ``0..K-1``; ``category_ids[label]`` is
    the COCO category id. Returns ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per box.
    """
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection sets")
    results: list[dict] = []
    for image_id, det in zip(image_ids, detections, strict=True):
        boxes = det["boxes"].detach().float().cpu().reshape(-1, 4)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels, strict=True):
            if not 0 <= label < len(category_ids):
                raise ValueError(f"label {label} outside the dataset's {len(category_ids)} categories")
            results.append(
                {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": box, "score": score}
            )
    return results


def merge_results(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """Joins the results gathered from ranks so each image is scored once.

    An image's results are taken from the first part that has any (distributed samplers may give an image to
    two ranks to even out their counts); exact duplicate records inside a part (an image seen twice by one
    rank) are dropped. Sorted by image id, then by descending score.
    """
    owner: dict[int, int] = {}
    merged: list[dict] = []
    seen: set[tuple] = set()
    for index, part in enumerate(parts):
        for r in part:
            image_id = int(r["image_id"])
            if owner.setdefault(image_id, index) != index:
                continue
            key = (image_id, r["category_id"], tuple(r["bbox"]), r["score"])
            if key in seen:
                continue
            seen.add(key)
            merged.append(r)
    merged.sort(key=lambda r: (int(r["image_id"]), -float(r["score"])))
    return merged


def coco_evaluate(
    ground_truth: dict, results: Sequence[dict], image_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """COCO bbox metrics (keys ``METRIC_NAMES``) of ``results`` against the COCO-format ``ground_truth``.

    ``image_ids`` restricts the evaluation to those images (e.g. the subset that was predicted); ``None``
    evaluates every image of the ground truth. Empty ``results`` score 0 wherever there are objects (-1 where
    there are none) instead of crashing in pycocotools. See ``coco_evaluate_with_summary`` for the text.
    """
    return coco_evaluate_with_summary(ground_truth, results, image_ids)[0]


def coco_evaluate_with_summary(
    ground_truth: dict, results: Sequence[dict], image_ids: Sequence[int] | None = None
) -> tuple[dict[str, float], str]:
    """``coco_evaluate`` plus the table pycocotools' ``summarize()`` prints (captured, not printed)."""
    result = coco_evaluate_full(ground_truth, results, image_ids)
    return result.metrics, result.summary


def coco_evaluate_full(
    ground_truth: dict, results: Sequence[dict], image_ids: Sequence[int] | None = None
) -> CocoResult:
    """The metrics, pycocotools' summary and the per-class figures (``engine.per_class``) of ``results``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for key in ("images", "annotations", "categories"):
        if key not in ground_truth:
            raise ValueError(f"ground truth is not COCO format: it has no {key!r} (keys: {sorted(ground_truth)})")
    known = {int(image["id"]) for image in ground_truth["images"]}
    unknown = {int(r["image_id"]) for r in results} - known
    if image_ids is not None:
        unknown |= {int(i) for i in image_ids} - known
    if unknown:
        raise ValueError(f"{len(unknown)} image ids are not in the ground truth, e.g. {sorted(unknown)[:5]}")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        truth = COCO()
        # COCOeval writes an "ignore" key into each annotation: give it copies, not the caller's dicts.
        truth.dataset = {**ground_truth, "annotations": [dict(a) for a in ground_truth["annotations"]]}
        truth.createIndex()
        detections = _load_results(truth, results)
        evaluator = COCOeval(truth, detections, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
    # Only the summary goes into the returned text, not pycocotools' progress lines.
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats, strict=False)}
    classes = per_class(evaluator)
    return CocoResult({**metrics, **flat_metrics(classes)}, summary.getvalue(), classes)


def _load_results(truth, results: Sequence[dict]):
    """``truth.loadRes(results)``, except that no results give an empty result set (loadRes crashes on [])."""
    from pycocotools.coco import COCO

    if results:
        # loadRes adds "area", "id" and "iscrowd" to each record: copies keep the caller's list unchanged.
        return truth.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])
    empty = COCO()
    empty.dataset = {"images": list(truth.dataset["images"]), "categories": truth.dataset["categories"]}
    empty.dataset["annotations"] = []
    empty.createIndex()
    return empty


def format_metrics_table(metrics: dict[str, float]) -> str:
    """The COCO metrics of ``metrics`` (other keys ignored) as a two-block console table; -1 shows as n/a."""
    lines = []
    for group in (METRIC_NAMES[:6], METRIC_NAMES[6:]):
        names = [name for name in group if name in metrics]
        if not names:
            continue
        values = [_format_value(metrics[name]) for name in names]
        width = [max(6, len(name), len(value)) for name, value in zip(names, values, strict=True)]
        lines.append("  ".join(name.rjust(w) for name, w in zip(names, width, strict=True)))
        lines.append("  ".join(value.rjust(w) for value, w in zip(values, width, strict=True)))
    return "\n".join(lines) if lines else "(no COCO metrics)"


def _format_value(value: float) -> str:
    value = float(value)
    return "n/a" if value < 0 or value != value else f"{value:.4f}"
