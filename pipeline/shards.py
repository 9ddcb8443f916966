"""The shard writer: COCO records + an image folder -> WebDataset shards, manifest and ground truth.

The layout is ``pipeline.format``'s. Images are assigned to shards before any is decoded, in ascending
image id, from the ``shard_images`` / ``shard_bytes`` limits and the files' sizes on disk (plus a fixed
per-sample tar overhead), so a rerun with the same inputs and limits maps every image to the same
shard. A skipped image keeps its slot (its shard just holds one image fewer), so skipping is
deterministic too, and a shard's tar bytes are identical from run to run (fixed member metadata).

Resume: a shard whose object already exists with the expected size is not rewritten (another size
raises ``ShardConflictError``: it comes from other inputs or limits). Its counts are recomputed from the
inputs by building it in memory exactly as a first run would, so a resumed run's manifest equals a
fresh run's; this costs the decode check but no upload. The manifest and ``ground_truth.json`` are
written last, and only when their content changed.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import format as fmt
from pipeline import storage
from pipeline.coco import CocoDataset, ImageRecord
from pipeline.images import check_image

log = logging.getLogger(__name__)

TAR_OVERHEAD_PER_SAMPLE = 2048  # two 512-byte headers, padding and the record, for the byte-size plan


@dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """How to cut shards: at most ``shard_images`` images and (if set) about ``shard_bytes`` bytes each."""

    prefix: str = fmt.DEFAULT_PREFIX
    shard_images: int = 1000
    shard_bytes: int | None = None
    workers: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shard_images < 1:
            raise ValueError(f"shard_images must be >= 1 (got {self.shard_images})")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1 (got {self.shard_bytes})")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1 (got {self.workers})")
        if not self.prefix or "/" in self.prefix or any(c in self.prefix for c in "*?[]"):
            raise ValueError(f"prefix must be a plain name without '/' or glob characters (got {self.prefix!r})")


class ShardConflictError(ValueError):
    """An existing shard differs from the one this conversion makes (other inputs or shard limits)."""


@dataclass
class ShardResult:
    """What one shard holds (``image_ids``), what was skipped from it, and whether this run wrote it."""

    index: int
    name: str
    image_ids: list[int] = field(default_factory=list)
    num_boxes: int = 0
    num_bytes: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    num_converted: int = 0
    written: bool = False


@dataclass
class ConversionReport:
    manifest: dict[str, Any]
    manifest_uri: str
    shards: list[ShardResult]

    @property
    def num_written_shards(self) -> int:
        return sum(s.written for s in self.shards)

    @property
    def num_converted_images(self) -> int:
        return sum(s.num_converted for s in self.shards)


def plan_shards(
    images: list[ImageRecord], images_dir: Path, shard_images: int, shard_bytes: int | None = None
) -> list[list[ImageRecord]]:
    """Images (in the given order) cut into shards by count and estimated bytes; a missing file counts 0."""
    shards: list[list[ImageRecord]] = []
    current: list[ImageRecord] = []
    current_bytes = 0
    for image in images:
        path = images_dir / image.file_name
        size = (path.stat().st_size if path.is_file() else 0) + TAR_OVERHEAD_PER_SAMPLE
        full = len(current) >= shard_images or (shard_bytes is not None and current_bytes + size > shard_bytes)
        if current and full:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(image)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def build_shard(
    index: int, prefix: str, images: list[ImageRecord], images_dir: Path, tick: Callable[[], None] = lambda: None
) -> tuple[bytes, ShardResult]:
    """The tar bytes of one shard and its counts; images that fail the check are skipped with a reason."""
    result = ShardResult(index=index, name=fmt.shard_name(prefix, index))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image in images:
            path = images_dir / image.file_name
            try:
                data = path.read_bytes()
            except OSError as e:
                checked_reason, jpeg = f"cannot read {path} ({type(e).__name__}: {e.strerror or e})", None
            else:
                checked = check_image(data, image.width, image.height)
                checked_reason, jpeg = checked.reason, checked.jpeg
                result.num_converted += checked.converted_from is not None
            if jpeg is None:
                log.warning("skipping image %d (%s): %s", image.image_id, image.file_name, checked_reason)
                result.skipped.append(
                    {"image_id": image.image_id, "file_name": image.file_name, "reason": checked_reason}
                )
            else:
                key = fmt.sample_key(image.image_id)
                record = json.dumps(image.to_record(), separators=(",", ":")).encode()
                _add_member(tar, f"{key}.{fmt.IMAGE_EXT}", jpeg)
                _add_member(tar, f"{key}.{fmt.RECORD_EXT}", record)
                result.image_ids.append(image.image_id)
                result.num_boxes += len(image.boxes)
            tick()
    data = buffer.getvalue()
    result.num_bytes = len(data)
    return data, result


def write_shards(dataset: CocoDataset, images_dir: str | Path, output: str, options: ShardOptions) -> ConversionReport:
    """Writes the shards (a thread pool builds and uploads them), then the ground truth and the manifest."""
    images_dir = Path(images_dir)
    plan = plan_shards(dataset.images, images_dir, options.shard_images, options.shard_bytes)
    bar = tqdm(total=len(dataset.images), unit="img", desc="converting", disable=not options.progress)
    lock = threading.Lock()

    def tick() -> None:
        with lock:
            bar.update(1)

    def one(index: int) -> ShardResult:
        data, result = build_shard(index, options.prefix, plan[index], images_dir, tick)
        uri = storage.join(output, result.name)
        size = storage.size(uri)
        if size is None:
            storage.write_bytes(uri, data)
            result.written = True
        elif size != len(data):
            raise ShardConflictError(
                f"{uri} already exists with {size} bytes, but this conversion makes it {len(data)} bytes: it comes "
                "from other inputs or shard limits. Write to an empty output or choose another prefix."
            )
        return result

    pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="shard")
    try:
        results = list(pool.map(one, range(len(plan))))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed upload stops the shards not yet started
        bar.close()
    ground_truth = ground_truth_dict(dataset, {i for r in results for i in r.image_ids})
    _write_if_changed(storage.join(output, fmt.GROUND_TRUTH), _dumps(ground_truth))
    manifest = manifest_dict(dataset, results, options.prefix)
    manifest_uri = storage.join(output, fmt.MANIFEST)
    _write_if_changed(manifest_uri, _dumps(manifest))
    return ConversionReport(manifest=manifest, manifest_uri=manifest_uri, shards=results)


def manifest_dict(dataset: CocoDataset, results: list[ShardResult], prefix: str) -> dict[str, Any]:
    """``manifest.json`` as specified in ``pipeline.format``."""
    return {
        "format": fmt.FORMAT,
        "prefix": prefix,
        "shards": [
            {"name": r.name, "num_images": len(r.image_ids), "num_boxes": r.num_boxes, "num_bytes": r.num_bytes}
            for r in results
        ],
        "num_images": sum(len(r.image_ids) for r in results),
        "num_boxes": sum(r.num_boxes for r in results),
        "categories": [{"id": c.id, "name": c.name, "label": c.label} for c in dataset.categories],
        "ground_truth": fmt.GROUND_TRUTH,
        "skipped_images": [s for r in results for s in r.skipped],
        "dropped_boxes": [
            {"image_id": d.image_id, "annotation_id": d.annotation_id, "reason": d.reason}
            for d in dataset.dropped_boxes
        ],
        "num_clipped_boxes": dataset.num_clipped_boxes,
        "skipped_labels": dataset.skipped_labels,
    }


def ground_truth_dict(dataset: CocoDataset, image_ids: set[int]) -> dict[str, Any]:
    """COCO ``{"images", "annotations", "categories"}`` of exactly the written images and boxes (xywh)."""
    images, annotations = [], []
    for im in dataset.images:
        if im.image_id not in image_ids:
            continue
        images.append({"id": im.image_id, "file_name": im.file_name, "width": im.width, "height": im.height})
        for box, cid, crowd, ann_id, area in zip(
            im.boxes, im.category_ids, im.iscrowd, im.annotation_ids, im.areas, strict=True
        ):
            x1, y1, x2, y2 = box
            annotations.append(
                {"id": ann_id, "image_id": im.image_id, "category_id": cid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "area": area, "iscrowd": crowd}
            )  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": dataset.raw_categories}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0: the same bytes from every run
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _write_if_changed(uri: str, data: bytes) -> None:
    if storage.exists(uri) and storage.read_bytes(uri) == data:
        return
    storage.write_bytes(uri, data)
