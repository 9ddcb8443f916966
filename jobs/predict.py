"""Draw a checkpoint's detections on any images and write them as PNG and JSON.

python jobs/predict.py --checkpoint runs/demo/best --images DIR --output DIR [--score-thresh 0.3|auto]

``--score-thresh auto`` keeps, per class, the detections at or above the score that maximised F1 at IoU 0.5
in the last evaluation (the checkpoint's thresholds.json, or ``--thresholds FILE`` from jobs/evaluate.py).
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
    ap.add_argument("--score-thresh", default="0.3", help="a number, or auto: per class, from thresholds.json")
    ap.add_argument("--thresholds", help="a thresholds.json (jobs/evaluate.py --out) for --score-thresh auto")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    files = sorted(p for p in args.images.glob("*") if p.suffix.lower() in EXTENSIONS) if args.images.is_dir() else []
    if not files:
        print(f"error: no images ({', '.join(sorted(EXTENSIONS))}) in {args.images}", file=sys.stderr)
        return 2
    import numpy as np
    from PIL import Image

    from engine.inference import class_thresholds, load_predictor
    from engine.visualize import draw_detections
    from pipeline import storage
    from pipeline.storage import StorageError

    try:
        with tempfile.TemporaryDirectory() as tmp:
            predictor = load_predictor(str(args.checkpoint), Path(tmp), args.device)
        saved, where = predictor.thresholds, predictor.uri
        if args.thresholds:
            saved, where = json.loads(storage.read_bytes(args.thresholds)), args.thresholds
        thresholds = class_thresholds(args.score_thresh, predictor.class_names, saved, where)
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
        keep = det["scores"] >= thresholds[det["labels"]]
        kept = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
        drawn = draw_detections(rgb, *kept, names, score_thresh=0.0)
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
