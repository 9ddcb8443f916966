"""The dataset and anchor doctor: what is in a set of shards, and how well the model's anchors fit it.
(Not ``jobs/inspect.py``: every script in ``jobs/`` has that folder first on ``sys.path``, so a file named
``inspect`` would shadow the standard library's module for all of them.)

    python jobs/doctor.py --data URI [--recipe R --set model.anchor_sizes=[...] ...] [--json report.json]

Reads ``manifest.json`` and ``ground_truth.json`` beside the shards (local or ``s3://``) and, under the
recipe's anchor settings and its evaluation resize, prints: images, boxes, images without boxes, boxes per
class; tiny boxes (under 4 px after the resize) and duplicates; and the anchor coverage (the share of boxes
matched at IoU >= fg_iou_thresh, matched only through the low-quality rule, or not at all, and with best
IoU under bg_iou_thresh), overall, per class and per FPN level, computed with the model's own anchor
generator and matcher (``engine/anchor_coverage.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import _bootstrap  # noqa: F401

TINY_PX = 4.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder or URI of shards written by jobs/convert.py")
    ap.add_argument("--recipe", default="coco_r50_1x", help="the model and resize settings (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, help="also write the report here")
    return ap.parse_args(argv)


def diagnose(ground_truth: dict, cfg) -> dict:
    """The report (see the module doc) of a COCO ground truth under ``cfg`` (a ``TrainConfig``)."""
    from engine.anchor_coverage import dataset_coverage, eval_scale

    aug = cfg.data.loader.aug
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in ground_truth["images"]}
    anns = [a for a in ground_truth["annotations"] if not a.get("iscrowd")]
    tiny, seen, duplicates = 0, set(), 0
    for a in anns:
        s = eval_scale(*sizes[a["image_id"]], aug.eval_size, aug.max_size)
        tiny += min(a["bbox"][2], a["bbox"][3]) * s < TINY_PX
        key = (a["image_id"], a["category_id"], *(round(v, 1) for v in a["bbox"]))
        duplicates += key in seen
        seen.add(key)
    coverage = dataset_coverage(ground_truth, cfg.model, aug.eval_size, aug.max_size)
    labels = {i: c["name"] for i, c in enumerate(sorted(ground_truth["categories"], key=lambda c: c["id"]))}
    with_boxes = {a["image_id"] for a in anns}
    return {
        "images": len(sizes), "boxes": len(anns), "images_without_boxes": len(sizes) - len(with_boxes),
        "boxes_per_class": dict(Counter(names[a["category_id"]] for a in anns).most_common()),
        "tiny_boxes": tiny, "duplicate_boxes": duplicates,
        "coverage": coverage.report(labels),
    }  # fmt: skip


def format_report(report: dict) -> str:
    def row(name: str, s: dict) -> str:
        return (f"  {name:<16} {s['boxes']:>7} boxes  fg {s['fg']:6.1%}  low-quality only {s['low_quality']:6.1%}  "
                f"unmatched {s['unmatched']:6.1%}  best IoU < bg {s['below_bg']:6.1%}")  # fmt: skip

    c = report["coverage"]
    lines = [f"{report['images']} images ({report['images_without_boxes']} without boxes), {report['boxes']} boxes",
             f"tiny boxes (< {TINY_PX:g} px after the resize): {report['tiny_boxes']}; "
             f"duplicates: {report['duplicate_boxes']}", "anchor coverage:", row("all", c["overall"])]  # fmt: skip
    lines += [row(level, s) for level, s in c["per_level"].items()]
    lines += [row(name, s) for name, s in c["per_class"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.config import apply_overrides
    from engine.recipes import get_recipe
    from pipeline import storage
    from pipeline.loader import open_dataset

    try:
        cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
        dataset = open_dataset(args.data)
        ground_truth = json.loads(storage.read_bytes(dataset.ground_truth_uri))
    except (ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = diagnose(ground_truth, cfg)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
