"""The dataset and anchor doctor: what is in a set of shards, and how well the model's anchors fit it.
(Not ``jobs/inspect.py``: every script in ``jobs/`` has that folder first on ``sys.path``, so a file named
``inspect`` would shadow the standard library's module for all of them.)

    python jobs/doctor.py --data URI [--recipe R --set model.anchor_sizes=[...] ...] [--out DIR] [--no-fit]

Reads ``manifest.json`` and ``ground_truth.json`` beside the shards (local or ``s3://``) and, under the
recipe's anchor settings and its evaluation resize, prints: images, boxes, images without boxes, boxes per
class, image sizes and box sizes after the resize; tiny boxes (under 4 px after the resize), duplicates and
boxes at the image border (cut by the frame, or clipped when converted); and the anchor coverage (the share
of boxes matched at IoU >= fg_iou_thresh, matched only through the low-quality rule, or not at all, and with
best IoU under bg_iou_thresh), overall, per class and per FPN level, computed with the model's own anchor
generator and matcher (``engine/anchor_coverage.py``). Then an anchor fit (``engine/anchor_fit.py``): sizes,
scales and ratios at the same anchor count that cover more boxes, as a ``--set`` line with the coverage
before and after; ``jobs/tune.py --space anchors --anchors-from DIR/report.json`` searches around it.

Writes to ``--out`` (default ``doctor/``, local or ``s3://``): ``report.json``, ``sizes.png`` (box sizes
and ratios against each level's anchors, image sizes) and ``anchors.png`` (a few images with their boxes
and the anchors assigned to each).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import _bootstrap  # noqa: F401

TINY_PX = 4.0
BORDER_PX = 1.0  # a box edge this close to the image's edge counts as at the border


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder or URI of shards written by jobs/convert.py")
    ap.add_argument("--recipe", default="coco_r50_1x", help="the model and resize settings (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="doctor", help="folder or URI for report.json and the PNGs (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="also write the report to this file")
    ap.add_argument("--no-fit", action="store_true", help="skip the anchor fit")
    ap.add_argument("--fit-images", type=int, default=64, help="images the fit searches on (default: %(default)s)")
    return ap.parse_args(argv)


def box_checks(ground_truth: dict, eval_size: int, max_size: int) -> dict:
    """Counts of tiny (under ``TINY_PX`` after the resize), duplicate and border boxes (non-crowd)."""
    from engine.anchor_coverage import eval_scale

    sizes = {im["id"]: (im["height"], im["width"]) for im in ground_truth["images"]}
    tiny, border, seen, duplicates = 0, 0, set(), 0
    for a in ground_truth["annotations"]:
        if a.get("iscrowd"):
            continue
        (h, w), (x, y, bw, bh) = sizes[a["image_id"]], a["bbox"]
        tiny += min(bw, bh) * eval_scale(h, w, eval_size, max_size) < TINY_PX
        border += min(x, y, w - x - bw, h - y - bh) < BORDER_PX
        key = (a["image_id"], a["category_id"], *(round(v, 1) for v in a["bbox"]))
        duplicates += key in seen
        seen.add(key)
    return {"tiny_boxes": tiny, "duplicate_boxes": duplicates, "border_boxes": border}


def size_stats(ground_truth: dict, eval_size: int, max_size: int) -> dict:
    """Quartiles of the images' sides and, after the eval resize, of box sides sqrt(w h) and ratios h / w."""
    import numpy as np

    from engine.doctor_plots import resized_boxes

    def quartiles(values) -> list[float]:
        return [round(float(v), 2) for v in np.percentile(values, [0, 25, 50, 75, 100])] if len(values) else []

    wh = resized_boxes(ground_truth, eval_size, max_size)
    return {
        "image_width": quartiles([im["width"] for im in ground_truth["images"]]),
        "image_height": quartiles([im["height"] for im in ground_truth["images"]]),
        "box_side": quartiles(np.sqrt(wh.prod(axis=1))),
        "box_ratio": quartiles(wh[:, 1] / np.maximum(wh[:, 0], 1e-6)),
    }


def diagnose(ground_truth: dict, cfg) -> dict:
    """The report (see the module doc, less the fit) of a COCO ground truth under ``cfg`` (a ``TrainConfig``)."""
    from engine.anchor_coverage import dataset_coverage

    aug = cfg.data.loader.aug
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    anns = [a for a in ground_truth["annotations"] if not a.get("iscrowd")]
    coverage = dataset_coverage(ground_truth, cfg.model, aug.eval_size, aug.max_size)
    labels = {i: c["name"] for i, c in enumerate(sorted(ground_truth["categories"], key=lambda c: c["id"]))}
    with_boxes = {a["image_id"] for a in anns}
    return {
        "images": len(ground_truth["images"]), "boxes": len(anns),
        "images_without_boxes": len(ground_truth["images"]) - len(with_boxes),
        "boxes_per_class": dict(Counter(names[a["category_id"]] for a in anns).most_common()),
        **box_checks(ground_truth, aug.eval_size, aug.max_size),
        "sizes": size_stats(ground_truth, aug.eval_size, aug.max_size),
        "coverage": coverage.report(labels),
    }  # fmt: skip


def format_report(report: dict) -> str:
    def row(name: str, s: dict) -> str:
        return (f"  {name:<16} {s['boxes']:>7} boxes  fg {s['fg']:6.1%}  low-quality only {s['low_quality']:6.1%}  "
                f"unmatched {s['unmatched']:6.1%}  best IoU < bg {s['below_bg']:6.1%}")  # fmt: skip

    def spread(q: list[float]) -> str:
        return f"{q[0]:g} / {q[2]:g} / {q[4]:g}" if q else "-"

    c, z = report["coverage"], report["sizes"]
    lines = [f"{report['images']} images ({report['images_without_boxes']} without boxes), {report['boxes']} boxes",
             f"image width, height (min / median / max): {spread(z['image_width'])}, {spread(z['image_height'])}",
             f"after the eval resize, box side sqrt(w h): {spread(z['box_side'])} px; "
             f"h / w: {spread(z['box_ratio'])}",
             f"tiny boxes (< {TINY_PX:g} px after the resize): {report['tiny_boxes']}; "
             f"duplicates: {report['duplicate_boxes']}; at the image border: {report['border_boxes']}",
             "anchor coverage:", row("all", c["overall"])]  # fmt: skip
    lines += [row(level, s) for level, s in c["per_level"].items()]
    lines += [row(name, s) for name, s in c["per_class"].items()]
    if fit := report.get("fit"):
        b, a = fit["before"], fit["after"]
        lines += [f"anchor fit ({fit['anchors_per_location']} anchors per location, searched on {fit['fit_images']} "
                  f"images, {fit['candidates']} candidates): fg {b['fg']:.1%} -> {a['fg']:.1%}, "
                  f"best IoU < bg {b['below_bg']:.1%} -> {a['below_bg']:.1%}",
                  f"  {fit['set_line']}"]  # fmt: skip
    return "\n".join(lines)


def write_outputs(report: dict, ground_truth: dict, dataset, cfg, out: str) -> list[str]:
    """``report.json``, ``sizes.png`` and ``anchors.png`` under ``out``; returns their URIs."""
    from engine.doctor_plots import plot_assignments, plot_sizes
    from pipeline import storage

    aug = cfg.data.loader.aug
    paths = [storage.join(out, name) for name in ("report.json", "sizes.png", "anchors.png")]
    storage.write_bytes(paths[0], json.dumps(report, indent=1).encode())
    plot_sizes(ground_truth, cfg.model, aug.eval_size, aug.max_size, paths[1])
    if not plot_assignments(dataset.shards, cfg.model, aug.eval_size, aug.max_size, paths[2]):
        paths.pop()
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.anchor_fit import fit_anchors
    from engine.config import apply_overrides
    from engine.recipes import get_recipe
    from pipeline import storage
    from pipeline.loader import open_dataset

    try:
        if args.fit_images < 1:
            raise ValueError(f"--fit-images must be at least 1, got {args.fit_images}")
        cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
        dataset = open_dataset(args.data)
        ground_truth = json.loads(storage.read_bytes(dataset.ground_truth_uri))
    except (ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = diagnose(ground_truth, cfg)
    aug = cfg.data.loader.aug
    if not args.no_fit and report["boxes"]:
        fit = fit_anchors(ground_truth, cfg.model, aug.eval_size, aug.max_size, max_images=args.fit_images,
                          before=report["coverage"]["overall"])  # fmt: skip
        report["fit"] = fit.report()
    print(format_report(report))
    try:
        paths = write_outputs(report, ground_truth, dataset, cfg, args.out)
    except storage.StorageError as e:
        print(f"error: cannot write the report to {args.out}: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
