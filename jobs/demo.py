"""The demo: synthetic detection data -> shards -> Ray Train on 2 CPU workers -> COCO evaluation.

    python3 dev.py demo            # or: .venv/bin/python jobs/demo.py [--fresh] [--set KEY=VALUE ...]

1. Generates a deterministic synthetic dataset (5 shape classes, small to large objects, a held-out
   validation split) under data/demo/raw, with data/demo/raw/preview.png to look at.
2. Converts both splits to WebDataset shards (data/demo/train, data/demo/val).
3. Trains the ``demo`` recipe (ResNet-18 RetinaNet) with 2 Ray workers on the CPU, evaluating on the
   validation split, with checkpoints, metrics.jsonl, TensorBoard and PNGs under runs/demo.
4. Prints the COCO metrics and where the predictions and loss/AP curves are.

Every step is skipped when its output is already there: a rerun reports the finished run again.
"""

from __future__ import annotations

import argparse
import sys
import time

import _bootstrap

from engine.config import apply_overrides
from engine.recipes import get_recipe

DATA = _bootstrap.ROOT / "data" / "demo"
RUNS = _bootstrap.ROOT / "runs"
TARGET_AP50 = 0.5


def prepare_data() -> None:
    from pipeline.coco import load_coco
    from pipeline.shards import ShardOptions, write_shards
    from pipeline.synthetic import generate, preview

    raw = DATA / "raw"
    if not (raw / "val" / "annotations.json").exists():
        start = time.perf_counter()
        generate(raw, num_train=800, num_val=100, image_size=256, seed=0)
        preview(raw, "val", raw / "preview.png", num=8)
        print(
            f"generated 800 + 100 synthetic images in {time.perf_counter() - start:.0f}s (look: {raw / 'preview.png'})"
        )
    for split in ("train", "val"):
        if not (DATA / split / "manifest.json").exists():
            dataset = load_coco(raw / split / "annotations.json")
            report = write_shards(
                dataset, raw / split / "images", str(DATA / split), ShardOptions(shard_images=100, progress=False)
            )
            images = report.manifest["num_images"]
            print(f"converted {split}: {images} images in {len(report.shards)} shards -> {DATA / split}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", action="store_true", help="start a new run instead of reporting or resuming runs/demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}" if args.fresh else "demo"
    try:
        cfg = apply_overrides(
            get_recipe("demo"),
            [f"data.train_uri={DATA / 'train'}", f"data.val_uri={DATA / 'val'}", f"checkpoint.storage_path={RUNS}",
             f"checkpoint.name={name}", *args.overrides],
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prepare_data()
    from engine.coco_eval import format_metrics_table
    from engine.driver import log_dir, run_job

    start = time.perf_counter()
    print(
        f"training '{cfg.recipe}' with {cfg.scaling.num_workers} Ray workers on the CPU for {cfg.optim.max_iters} steps"
    )
    result = run_job(cfg)
    if isinstance(result, int):
        return result
    metrics = result.metrics or {}
    logs = log_dir(cfg)
    print(f"\nfinished step {metrics.get('step')} in {(time.perf_counter() - start) / 60:.1f} min")
    if "AP" in metrics:
        print(f"COCO metrics on the {cfg.data.val_uri} split:\n{format_metrics_table(metrics)}")
        verdict = "reached" if metrics["AP50"] >= TARGET_AP50 else "NOT reached"
        print(f"target AP50 >= {TARGET_AP50}: {verdict} ({metrics['AP50']:.3f})")
    predictions = sorted(logs.glob("predictions_*.png"))
    print(f"predictions: {predictions[-1] if predictions else 'none'}")
    print(f"loss and AP curves: {logs / 'curves.png'}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}; TensorBoard: {logs / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
