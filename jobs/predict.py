"""Draw a checkpoint's detections on any images and write them as PNG and JSON. The images go through the
evaluation's own DALI pipeline (decode, resize, normalisation, padding; other formats than JPEG re-encoded as
jobs/convert.py does), so the detections are the ones jobs/evaluate.py scores.

python jobs/predict.py --checkpoint runs/demo/best --images DIR --output DIR [--score-thresh 0.3|auto]
python jobs/predict.py --checkpoint runs/demo/best --data s3://b/shards --output s3://b/pred --workers 4

``--data``: every shard of a converted data set (local or s3://), spread over ``--workers`` Ray actors (one
GPU each where the cluster has GPUs); OUTPUT gets one COCO results json per shard (all detections the model
keeps, for scoring or pseudo-labels), and a rerun skips the shards already written.

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of images")
    source.add_argument("--data", help="a converted data set (folder or s3://): predict on its shards")
    ap.add_argument("--output", required=True, help="a folder (or, with --data, an s3:// URI)")
    ap.add_argument("--score-thresh", default="0.3", help="a number, or auto: per class, from thresholds.json")
    ap.add_argument("--thresholds", help="a thresholds.json (jobs/evaluate.py --out) for --score-thresh auto")
    ap.add_argument("--workers", type=int, default=1, help="with --data: Ray actors, each a CPU or a GPU")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args(argv)


def predict_folder(args: argparse.Namespace) -> int:
    files = sorted(p for p in args.images.glob("*") if p.suffix.lower() in EXTENSIONS) if args.images.is_dir() else []
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {args.images}")
    import numpy as np
    from PIL import Image

    from engine.inference import class_thresholds, load_predictor
    from engine.visualize import draw_detections
    from pipeline import storage

    with tempfile.TemporaryDirectory() as tmp:
        predictor = load_predictor(str(args.checkpoint), Path(tmp), args.device)
    saved, where = predictor.thresholds, predictor.uri
    if args.thresholds:
        saved, where = json.loads(storage.read_bytes(args.thresholds)), args.thresholds
    thresholds = class_thresholds(args.score_thresh, predictor.class_names, saved, where)
    output, names = Path(args.output), predictor.class_names
    output.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(files), CHUNK):
        readable = [(path, image) for path in files[start : start + CHUNK] if (image := read_image(path))]
        for (path, (jpeg, _, _)), det in zip(readable, predictor.predict_images([i for _, i in readable]), strict=True):
            rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            keep = det["scores"] >= thresholds[det["labels"]]
            kept = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
            draw_detections(rgb, *kept, names, score_thresh=0.0).save(output / f"{path.stem}.png")
            records = [{"box_xyxy": [round(v, 2) for v in box.tolist()], "score": round(float(score), 4),
                        "class": names[int(label)]} for box, label, score in zip(*kept, strict=True)]  # fmt: skip
            (output / f"{path.stem}.json").write_text(json.dumps({"image": path.name, "detections": records}, indent=1))
            print(f"{path.name}: {len(records)} detections")
    print(f"wrote PNG and JSON per image to {output}")
    return 0


def predict_data(args: argparse.Namespace) -> int:
    from engine import checkpoint as ckpt
    from engine.driver import init_ray
    from engine.predict_shards import predict_shards
    from pipeline import storage
    from pipeline.loader import open_dataset

    checkpoint = ckpt.resolve(storage.absolute(args.checkpoint))
    dataset = open_dataset(storage.absolute(args.data))
    init_ray()
    done = predict_shards(checkpoint, dataset, storage.absolute(args.output), args.workers)
    print(f"{done.shards} shards ({done.skipped} written by an earlier run): {done.images} images in "
          f"{done.seconds:.1f} s, {done.images_per_s:.1f} images/s with {args.workers} worker(s); "
          f"COCO results json per shard in {args.output}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.storage import StorageError

    try:
        return predict_data(args) if args.data else predict_folder(args)
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
