"""COCO detection json -> per-image records with validated boxes (xyxy, clipped) and contiguous labels.

Boxes: COCO ``bbox`` is ``[x, y, w, h]`` in float pixels. A box partly outside its image is clipped to
it and counted; a box that is not finite, or narrower / shorter than ``MIN_BOX_SIZE`` after clipping,
is dropped and listed with its reason, as is an annotation whose category or image id is unknown.
``iscrowd`` is kept as a per-box flag. Images without boxes are kept: they are valid negatives.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_BOX_SIZE = 1e-3  # pixels; narrower or shorter boxes (after clipping) are degenerate
_REQUIRED = ("images", "annotations", "categories")


@dataclass(frozen=True)
class Category:
    """A COCO category and its contiguous training label (COCO ids sorted ascending -> 0..K-1)."""

    id: int
    name: str
    label: int


@dataclass
class ImageRecord:
    """One image and its kept boxes.

    ``boxes`` are ``[x1, y1, x2, y2]`` float pixels of the original image, clipped to it, x2 > x1, y2 > y1.
    ``annotation_ids`` and ``areas`` are kept for the ground truth, not written into the shard record.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)
    annotation_ids: list[int] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """The shard record (``KEY.json``) of ``pipeline.format``."""
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
            "boxes": self.boxes,
            "category_ids": self.category_ids,
            "labels": self.labels,
            "iscrowd": self.iscrowd,
        }


@dataclass(frozen=True)
class DroppedBox:
    image_id: int
    annotation_id: int
    reason: str


@dataclass
class CocoDataset:
    """The images (ascending id) with their kept boxes, the categories, and what was dropped or clipped."""

    images: list[ImageRecord]
    categories: list[Category]
    raw_categories: list[dict[str, Any]]
    dropped_boxes: list[DroppedBox]
    num_clipped_boxes: int
    skipped_labels: list[dict[str, Any]] = field(default_factory=list)  # importers: {"file", "line", "reason"}

    @property
    def num_boxes(self) -> int:
        return sum(len(im.boxes) for im in self.images)


def load_coco(path: str | Path) -> CocoDataset:
    """Reads a COCO detection json file; ``ValueError`` if it is not one (names the file and the problem)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass a COCO detection annotations file") from e
    return parse_coco(data, source=str(path))


def parse_coco(data: Any, source: str = "annotations") -> CocoDataset:
    """Validates a parsed COCO detection dict and builds the per-image records (see the module doc)."""
    _check_structure(data, source)
    categories = category_labels(data["categories"], source)
    label_of = {c.id: c.label for c in categories}
    images: dict[int, ImageRecord] = {}
    for i, im in enumerate(data["images"]):
        record = _image_record(im, i, source)
        if record.image_id in images:
            raise ValueError(f"{source}: image id {record.image_id} appears twice in 'images'")
        images[record.image_id] = record

    dropped: list[DroppedBox] = []
    num_clipped = 0
    for ann in sorted(data["annotations"], key=_annotation_order(source)):
        image_id, ann_id = int(ann["image_id"]), int(ann["id"])
        image = images.get(image_id)
        if image is None:
            dropped.append(DroppedBox(image_id, ann_id, f"unknown image id {image_id}"))
            continue
        if ann.get("category_id") not in label_of:
            dropped.append(DroppedBox(image_id, ann_id, f"unknown category id {ann.get('category_id')!r}"))
            continue
        box, clipped, reason = clip_box(ann.get("bbox"), image.width, image.height)
        if box is None:
            dropped.append(DroppedBox(image_id, ann_id, reason))
            continue
        num_clipped += clipped
        image.boxes.append(box)
        image.category_ids.append(int(ann["category_id"]))
        image.labels.append(label_of[ann["category_id"]])
        image.iscrowd.append(1 if ann.get("iscrowd", 0) else 0)
        image.annotation_ids.append(ann_id)
        area = ann.get("area")
        ok_area = isinstance(area, int | float) and math.isfinite(area) and area > 0
        image.areas.append(float(area) if ok_area else (box[2] - box[0]) * (box[3] - box[1]))
    return CocoDataset(
        images=[images[k] for k in sorted(images)],
        categories=categories,
        raw_categories=sorted(data["categories"], key=lambda c: c["id"]),
        dropped_boxes=dropped,
        num_clipped_boxes=num_clipped,
    )


def category_labels(categories: list[dict[str, Any]], source: str = "annotations") -> list[Category]:
    """Contiguous labels 0..K-1 in ascending COCO category id."""
    ids = []
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise ValueError(f"{source}: every entry of 'categories' needs an integer 'id' (got {c!r})")
        ids.append(c["id"])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: duplicate category ids in 'categories'")
    by_id = {c["id"]: c for c in categories}
    return [Category(cid, str(by_id[cid].get("name", cid)), label) for label, cid in enumerate(sorted(ids))]


def clip_box(bbox: Any, width: int, height: int) -> tuple[list[float] | None, bool, str]:
    """COCO ``[x, y, w, h]`` -> ``(xyxy clipped to the image or None, was clipped, reason if None)``."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return None, False, f"bbox is not [x, y, w, h] (got {bbox!r})"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, False, f"bbox has non-numeric values {bbox!r}"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, False, f"bbox has non-finite values {bbox!r}"
    x1, y1, x2, y2 = x, y, x + w, y + h
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 - cx1 < MIN_BOX_SIZE or cy2 - cy1 < MIN_BOX_SIZE:
        where = "" if (cx1, cy1, cx2, cy2) == (x1, y1, x2, y2) else " after clipping to the image"
        return None, False, f"degenerate box {cx2 - cx1:.4g}x{cy2 - cy1:.4g} px{where} (bbox {list(bbox)})"
    return [cx1, cy1, cx2, cy2], (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2), ""


def _check_structure(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not a COCO detection file (top level is {type(data).__name__}, not an object)")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(
            f"{source}: not a COCO detection file: missing key(s) {', '.join(missing)} "
            f"(a detection file has 'images', 'annotations' and 'categories')"
        )
    for k in _REQUIRED:
        if not isinstance(data[k], list):
            raise ValueError(f"{source}: '{k}' must be a list, got {type(data[k]).__name__}")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id"} <= ann.keys():
            raise ValueError(f"{source}: annotation #{i} lacks 'id' or 'image_id' (got {ann!r:.200})")
    if data["annotations"] and not any("bbox" in ann for ann in data["annotations"]):
        raise ValueError(f"{source}: no annotation has a 'bbox': not a COCO detection file (captions or keypoints?)")


def _annotation_order(source: str):
    def key(ann: dict[str, Any]) -> tuple[int, int]:
        try:
            return int(ann["image_id"]), int(ann["id"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: annotation ids must be integers (got {ann!r:.200})") from e

    return key


def _image_record(im: Any, index: int, source: str) -> ImageRecord:
    if not isinstance(im, dict):
        raise ValueError(f"{source}: images[{index}] is not an object")
    missing = [k for k in ("id", "file_name", "width", "height") if k not in im]
    if missing:
        raise ValueError(f"{source}: images[{index}] lacks {', '.join(missing)} (COCO images need all four)")
    width, height = im["width"], im["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"{source}: image {im['id']} has an invalid size {width!r}x{height!r}")
    if not isinstance(im["id"], int):
        raise ValueError(f"{source}: images[{index}] id must be an integer (got {im['id']!r})")
    return ImageRecord(image_id=im["id"], file_name=str(im["file_name"]), width=width, height=height)
