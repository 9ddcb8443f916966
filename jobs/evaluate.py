"""COCO-evaluate any checkpoint on any converted dataset: the 12 COCO numbers and, per class, AP, AP50,
AP75, ground-truth boxes and the score that maximises F1 at IoU 0.5 (from pycocotools' own arrays).

python jobs/evaluate.py --checkpoint runs/demo/best --data data/demo/val [--out DIR] [--output m.json]

``--out DIR`` (local or s3://) gets metrics.json, thresholds.json (per class: the best-F1 score threshold
with its precision and recall, what ``predict.py --score-thresh auto`` reads), detections.json (COCO
results records) and pr_curves.png (precision/recall per class at IoU 0.5 and 0.75).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401

CHECKPOINT_HELP = (
    "a checkpoint_NNNNNNNN folder, a run's best/, or a run (its newest complete checkpoint); local or s3://"
)


def write_outputs(out: str, result, checkpoint: str, data: str) -> list[str]:
    """metrics.json, thresholds.json, detections.json and pr_curves.png under ``out``; their URIs."""
    from engine.per_class import plot_pr_curves, thresholds
    from pipeline import storage

    paths = {n: storage.join(out, n) for n in ("metrics.json", "thresholds.json", "detections.json", "pr_curves.png")}
    files = {
        "metrics.json": {"checkpoint": checkpoint, "data": data, **result.metrics},
        "thresholds.json": {"checkpoint": checkpoint, "data": data, **thresholds(result.classes)},
        "detections.json": result.results,
    }
    for name, content in files.items():
        storage.write_bytes(paths[name], json.dumps(content, indent=1 if name != "detections.json" else None).encode())
    plot_pr_curves(result.classes, paths["pr_curves.png"])
    return list(paths.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint_NNNNNNNN folder, a run's best/, or a run folder (its newest complete checkpoint); local or s3://",
    )
    ap.add_argument("--data", required=True, help="a converted dataset (folder or URI with manifest.json)")
    ap.add_argument("--output", type=Path, help="metrics JSON (default: print only)")
    ap.add_argument("--out", help="folder or URI for metrics.json, thresholds.json, detections.json, pr_curves.png")
    ap.add_argument("--max-images", type=int)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    import torch

    from engine.coco_eval import format_metrics_table
    from engine.evaluate import evaluate
    from engine.inference import load_predictor
    from engine.per_class import format_table
    from pipeline.loader import open_dataset
    from pipeline.storage import StorageError

    try:
        with tempfile.TemporaryDirectory() as tmp:
            predictor = load_predictor(args.checkpoint, Path(tmp), args.device)
            dataset = open_dataset(args.data)
            if dataset.num_classes != predictor.cfg.model.num_classes:
                raise ValueError(f"{args.data} has {dataset.num_classes} classes, the checkpoint's model "
                                 f"{predictor.cfg.model.num_classes}")  # fmt: skip
            cfg = predictor.cfg
            result = evaluate(
                predictor.net, predictor.postprocess, dataset, rank=0, world_size=1,
                loader_cfg=replace(cfg.data.loader, batch_size=cfg.data.eval_batch_size),
                device=torch.device(args.device), max_images=args.max_images,
            )  # fmt: skip
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{predictor.uri}: {result.num_images} images\n{format_metrics_table(result.metrics)}")
    print(format_table(result.classes))
    if args.out:
        try:
            print(f"wrote {', '.join(write_outputs(args.out, result, args.checkpoint, args.data))}")
        except StorageError as e:
            print(f"error: cannot write to {args.out}: {e}", file=sys.stderr)
            return 2
    if args.output:
        args.output.write_text(
            json.dumps({"checkpoint": args.checkpoint, "data": args.data, **result.metrics}, indent=1)
        )
        print(f"metrics written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
