"""Draw a checkpoint's detections on any images and write them as PNG and JSON. The images go through the
evaluation's own DALI pipeline (decode, resize, normalisation, padding; other formats than JPEG re-encoded as
jobs/convert.py does), so the detections are the ones jobs/evaluate.py scores.

python jobs/predict.py --checkpoint runs/demo/best --images DIR --output DIR [--score-thresh 0.3|auto]

``--score-thresh auto`` keeps, per class, the detections at or above the score that maximised F1 at IoU 0.5
in the last evaluation (the checkpoint's thresholds.json, or ``--thresholds FILE`` from jobs/evaluate.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import _bootstrap  # noqa: F401

CHECKPOINT_HELP = (
    "a checkpoint_NNNNNNNN folder, a run's best/, or a run (its newest complete checkpoint); local or s3://"
)

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CHUNK = 64  # images read and predicted at a time


def read_image(path: Path) -> tuple[bytes, int, int] | None:
    """``(JPEG bytes, height, width)`` as jobs/convert.py would put it in a shard (other formats re-encoded),
    or None with a message when the file is not a decodable image."""
    from PIL import Image

    from pipeline.images import check_image

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except OSError as e:
        print(f"skipping {path.name}: not a readable image ({e})", file=sys.stderr)
        return None
    checked = check_image(data, width, height)
    if checked.jpeg is None:
        print(f"skipping {path.name}: {checked.reason}", file=sys.stderr)
        return None
    return checked.jpeg, height, width


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
    for start in range(0, len(files), CHUNK):
        chunk = [(path, read_image(path)) for path in files[start : start + CHUNK]]
        readable = [(path, image) for path, image in chunk if image is not None]
        detections = predictor.predict_images([image for _, image in readable])
        for (path, (jpeg, _, _)), det in zip(readable, detections, strict=True):
            rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            keep = det["scores"] >= thresholds[det["labels"]]
            kept = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
            draw_detections(rgb, *kept, names, score_thresh=0.0).save(args.output / f"{path.stem}.png")
            records = [{"box_xyxy": [round(v, 2) for v in box.tolist()], "score": round(float(score), 4),
                        "class": names[int(label)]} for box, label, score in zip(*kept, strict=True)]  # fmt: skip
            (args.output / f"{path.stem}.json").write_text(
                json.dumps({"image": path.name, "detections": records}, indent=1)
            )
            print(f"{path.name}: {len(records)} detections")
    print(f"wrote PNG and JSON per image to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
