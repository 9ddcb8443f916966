"""The on-storage format that ``jobs/convert.py`` writes and the readers read.

An output URI holds:

- ``{prefix}-{index:06d}.tar``: WebDataset shards. Each sample is two tar members sharing the key
  ``{image_id:012d}``: ``KEY.jpg`` (the original JPEG bytes; other formats re-encoded to JPEG) and
  ``KEY.json`` (a record, below). Samples are in ascending image id; shard contents are deterministic
  given the input and the shard size, so a rerun maps the same images to the same shard names.
- ``manifest.json`` (``MANIFEST``)::

    {"format": "retinanet-wds/1", "prefix": str,
     "shards": [{"name": str, "num_images": int, "num_boxes": int, "num_bytes": int}],  # tar size; 0 images is valid
     "num_images": int, "num_boxes": int,
     "categories": [{"id": int, "name": str, "label": int}],   # COCO id -> contiguous label 0..K-1
     "ground_truth": "ground_truth.json",
     "skipped_images": [{"image_id": int, "file_name": str, "reason": str}],
     "dropped_boxes": [{"image_id": int, "annotation_id": int, "reason": str}],
     "skipped_labels": [{"file": str, "line": int, "reason": str}],   # label lines/files an importer could not use
     "num_clipped_boxes": int}

- ``ground_truth.json``: COCO-format ``{"images", "annotations", "categories"}`` of exactly the images
  and boxes in the shards (boxes as written, xywh; ``area`` is the original COCO area, which
  ``COCOeval`` uses for small / medium / large), for pycocotools ``COCOeval``.

A record (``KEY.json``)::

    {"image_id": int, "file_name": str, "width": int, "height": int,
     "boxes": [[x1, y1, x2, y2], ...],     # float pixels of the original image, clipped to it, x2 > x1, y2 > y1
     "category_ids": [int, ...], "labels": [int, ...], "iscrowd": [0 | 1, ...]}
"""

from __future__ import annotations

FORMAT = "retinanet-wds/1"
MANIFEST = "manifest.json"
GROUND_TRUTH = "ground_truth.json"
IMAGE_EXT = "jpg"
RECORD_EXT = "json"
DEFAULT_PREFIX = "shard"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sample_key(image_id: int) -> str:
    return f"{image_id:012d}"
