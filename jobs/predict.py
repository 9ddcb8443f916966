"""Draw a checkpoint's detections on any images and write them as PNG and JSON.

python jobs/predict.py --checkpoint runs/demo/checkpoint_00000400 --images DIR --output DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401

CHECKPOINT_HELP = (
    "a checkpoint_NNNNNNNN folder, a run's best/, or a run (its newest complete checkpoint); local or s3://"
)

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint_NNNNNNNN folder, a run's best/, or a run folder (its newest complete checkpoint); local or s3://",
    )
    ap.add_argument("--images", type=Path, required=True, help="a folder of images")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--score-thresh", type=float, default=0.3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    files = sorted(p for p in args.images.glob("*") if p.suffix.lower() in EXTENSIONS) if args.images.is_dir() else []
    if not files:
        print(f"error: no images ({', '.join(sorted(EXTENSIONS))}) in {args.images}", file=sys.stderr)
        return 2
    import numpy as np
    from PIL import Image

    from engine.inference import load_predictor
    from engine.visualize import draw_detections
    from pipeline.storage import StorageError

    try:
        with tempfile.TemporaryDirectory() as tmp:
            predictor = load_predictor(str(args.checkpoint), Path(tmp), args.device)
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    names = predictor.class_names
    for path in files:
        try:
            rgb = np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
            print(f"skipping {path.name}: not a readable image ({e})", file=sys.stderr)
            continue
        det = predictor.predict(rgb)
        keep = det["scores"] >= args.score_thresh
        drawn = draw_detections(rgb, det["boxes"], det["labels"], det["scores"], names, score_thresh=args.score_thresh)
        drawn.save(args.output / f"{path.stem}.png")
        records = []
        for box, score, label in zip(det["boxes"][keep], det["scores"][keep], det["labels"][keep], strict=True):
            box_xyxy = [round(v, 2) for v in box.tolist()]
            records.append({"box_xyxy": box_xyxy, "score": round(float(score), 4), "class": names[int(label)]})
        (args.output / f"{path.stem}.json").write_text(
            json.dumps({"image": path.name, "detections": records}, indent=1)
        )
        print(f"{path.name}: {len(records)} detections")
    print(f"wrote PNG and JSON per image to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
