"""Convert a labelled detection dataset into WebDataset shards at a local folder, file:// or s3:// URI.

    python jobs/convert.py --annotations A.json --images DIR --output URI            # COCO json
    python jobs/convert.py --data PATH [--format voc|yolo|csv] [--split S] [--classes F] --output URI
        [--prefix NAME] [--shard-images N] [--shard-bytes BYTES] [--workers N]

``--data``: a Pascal VOC folder (devkit layout or XML files beside images), a YOLO folder (``images/``,
``labels/``, ``data.yaml`` or ``classes.txt``) or a keras-retinanet CSV file (``path,x1,y1,x2,y2,class``
with ``classes.csv`` beside it); the format is detected when only one fits, and printed. Writes
``{prefix}-NNNNNN.tar`` shards, ``ground_truth.json`` and ``manifest.json`` (``pipeline/format.py``); label
lines that cannot be used are listed with file and line in the manifest's ``skipped_labels``. S3 endpoints
and credentials come from the standard AWS sources (``AWS_ENDPOINT_URL``, ...). A rerun resumes: shards
already present are not rewritten.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

import _bootstrap  # noqa: F401

from pipeline import format as fmt
from pipeline import importers, shards, storage
from pipeline.coco import CocoDataset, load_coco, parse_coco
from pipeline.storage import StorageError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"256MB"``, ``"256 MiB"``, ``"1e8"`` or ``"1000"`` -> a positive number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    try:
        value = float(match.group(1)) * _UNITS[unit] if match and unit in _UNITS else None
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 256MB, 1GiB, 100000000)")
    return int(value)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", type=Path, help="COCO detection json (instances_*.json)")
    ap.add_argument("--images", type=Path, help="COCO: folder holding the images' file_name paths")
    ap.add_argument("--data", type=Path, help="VOC or YOLO folder, or CSV file (see above)")
    ap.add_argument("--format", choices=importers.FORMATS, help="label format (default: detected)")
    ap.add_argument("--split", help="VOC: ImageSets/Main/SPLIT.txt; YOLO: data.yaml's SPLIT: entry")
    ap.add_argument("--classes", type=Path, help="class names, one per line, in label order (CSV: class,id)")
    ap.add_argument("--output", required=True, help="output folder or URI (file://..., s3://bucket/prefix)")
    ap.add_argument("--prefix", default=fmt.DEFAULT_PREFIX, help="shard name prefix (default: %(default)s)")
    ap.add_argument("--shard-images", type=positive_int, default=1000, help="images per shard (default: 1000)")
    ap.add_argument("--shard-bytes", type=parse_bytes, help="bytes per shard, e.g. 256MB (whichever limit is first)")
    ap.add_argument("--workers", type=positive_int, default=4, help="shards built and uploaded in parallel")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def summarize(report: shards.ConversionReport, seconds: float) -> str:
    m = report.manifest
    lines = [
        f"wrote {m['num_images']} images with {m['num_boxes']} boxes in {len(m['shards'])} shards "
        f"({report.num_written_shards} written now, {len(m['shards']) - report.num_written_shards} already there) "
        f"in {seconds:.1f} s",
        f"converted to JPEG: {report.num_converted_images} images; clipped boxes: {m['num_clipped_boxes']}",
        f"skipped images: {len(m['skipped_images'])}",
    ]
    lines += [f"  {s['image_id']} {s['file_name']}: {s['reason']}" for s in m["skipped_images"][:20]]
    if len(m["skipped_images"]) > 20:
        lines.append(f"  ... and {len(m['skipped_images']) - 20} more (see the manifest)")
    lines.append(f"dropped boxes: {len(m['dropped_boxes'])}")
    reasons = Counter(re.sub(r"\s*\(.*", "", d["reason"]) for d in m["dropped_boxes"])
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common()]
    skipped = m.get("skipped_labels", [])
    lines.append(f"skipped label lines or files: {len(skipped)}")
    lines += [f"  {s['file']}:{s['line']}: {s['reason']}" for s in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more (see the manifest)")
    lines.append(f"manifest: {report.manifest_uri}")
    return "\n".join(lines)


def read_dataset(args: argparse.Namespace) -> tuple[CocoDataset, Path]:
    """The dataset and its images folder, from COCO json or an importer; ``ValueError`` for bad input."""
    fmt_ = args.format or ("coco" if args.annotations else importers.detect(args.data) if args.data else None)
    if fmt_ is None:
        raise ValueError("pass --annotations A.json --images DIR (COCO), or --data PATH (VOC, YOLO or CSV)")
    if fmt_ == "coco":
        if args.annotations is None or args.images is None:
            raise ValueError("COCO input needs --annotations A.json and --images DIR")
        if not args.annotations.is_file():
            raise ValueError(f"annotations file {args.annotations} does not exist (--annotations)")
        if not args.images.is_dir():
            raise ValueError(f"images folder {args.images} does not exist or is not a folder (--images)")
        return load_coco(args.annotations), args.images
    if args.data is None or not args.data.exists():
        raise ValueError(f"--data {args.data}: no such file or folder")
    imported = importers.load(fmt_, args.data, args.split, args.classes)
    print(f"format: {fmt_}{' (detected)' if args.format is None else ''}", flush=True)
    dataset = parse_coco(imported.data, source=str(args.data))
    dataset.skipped_labels = imported.skipped
    return dataset, imported.images_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = shards.ShardOptions(
            prefix=args.prefix, shard_images=args.shard_images, shard_bytes=args.shard_bytes,
            workers=args.workers, progress=not args.no_progress,
        )  # fmt: skip
        dataset, images_dir = read_dataset(args)
        storage.ensure_reachable(args.output)
    except (ValueError, StorageError) as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"{len(dataset.images)} images, {dataset.num_boxes} boxes, {len(dataset.categories)} categories "
        f"-> {args.output}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        report = shards.write_shards(dataset, images_dir, args.output, options)
    except shards.ShardConflictError as e:
        raise SystemExit(f"error: {e}") from None
    except StorageError as e:
        raise SystemExit(f"error: {e}\nrerun the same command to resume: shards already written are kept") from None
    print(summarize(report, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
