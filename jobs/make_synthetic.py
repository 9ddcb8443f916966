"""Generate the synthetic shapes detection dataset (COCO format) and a preview of it.

    python jobs/make_synthetic.py --output DIR [--train N] [--val N] [--size PX] [--seed S] [--classes SET]

Writes ``DIR/{train,val}/images/*.jpg``, ``DIR/{train,val}/annotations.json`` and ``DIR/preview.png``
(the first training images with their boxes), then prints what the data holds. The same arguments
give the same bytes. Convert a split to shards with
``python jobs/convert.py --annotations DIR/train/annotations.json --images DIR/train/images --output URI``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from pipeline import synthetic


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True, help="output folder (created)")
    ap.add_argument("--train", type=non_negative_int, default=500, help="training images (default: %(default)s)")
    ap.add_argument("--val", type=non_negative_int, default=100, help="validation images (default: %(default)s)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    ap.add_argument("--classes", default="shapes", choices=sorted(synthetic.CLASS_SETS),
                    help="shapes: the demo's 5 classes (default); marks: 3 others, for fine-tuning")  # fmt: skip
    ap.add_argument("--preview", type=non_negative_int, default=8, help="images in preview.png, 0: none")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = synthetic.generate(
            args.output,
            num_train=args.train,
            num_val=args.val,
            image_size=args.size,
            seed=args.seed,
            classes=args.classes,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    seconds = time.perf_counter() - start
    print(f"wrote {args.train} + {args.val} images to {args.output} in {seconds:.1f} s")
    print(synthetic.format_summary(summary))
    split = "train" if args.train else "val"
    if args.preview and (args.train or args.val):
        path = synthetic.preview(args.output, split, args.output / "preview.png", num=args.preview)
        print(f"preview ({split}): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
