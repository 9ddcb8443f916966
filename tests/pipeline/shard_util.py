"""Writes small shards by hand (test helper): for planting broken samples the converter would refuse."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from pipeline import format as fmt
from pipeline import storage


def coco_records(coco_dir: Path, num_images: int) -> tuple[list[tuple[bytes, dict]], list[dict]]:
    """The first ``num_images`` coco128 images by id as ``(jpeg, record)``, and the categories."""
    data = json.loads((coco_dir / "annotations" / "instances_train2017.json").read_text())
    label = {c: i for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    out = []
    for im in sorted(data["images"], key=lambda i: i["id"])[:num_images]:
        boxes = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns.get(im["id"], [])
        ]
        boxes = [[max(0, x1), max(0, y1), min(im["width"], x2), min(im["height"], y2)] for x1, y1, x2, y2 in boxes]
        record = {
            "image_id": im["id"],
            "file_name": im["file_name"],
            "width": im["width"],
            "height": im["height"],
            "boxes": boxes,
            "category_ids": [a["category_id"] for a in anns.get(im["id"], [])],
            "labels": [label[a["category_id"]] for a in anns.get(im["id"], [])],
            "iscrowd": [a.get("iscrowd", 0) for a in anns.get(im["id"], [])],
        }
        out.append(((coco_dir / "images" / "train2017" / im["file_name"]).read_bytes(), record))
    cats = [{"id": c["id"], "name": c["name"], "label": label[c["id"]]} for c in data["categories"]]
    return out, cats


def tar_bytes(samples: list[tuple[bytes, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for jpeg, record in samples:
            key = fmt.sample_key(record["image_id"])
            for ext, data in ((fmt.IMAGE_EXT, jpeg), (fmt.RECORD_EXT, json.dumps(record).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_dataset(uri: str, shards: list[bytes], categories: list[dict]) -> None:
    """Shards (tar bytes) plus a manifest in the format of ``pipeline/format.py``."""
    entries = []
    for i, data in enumerate(shards):
        name = fmt.shard_name("shard", i)
        storage.write_bytes(storage.join(uri, name), data)
        entries.append({"name": name, "num_images": 0, "num_boxes": 0, "num_bytes": len(data)})
    manifest = {"format": fmt.FORMAT, "prefix": "shard", "shards": entries, "categories": categories}
    storage.write_bytes(storage.join(uri, fmt.MANIFEST), json.dumps(manifest).encode())


def split(samples: list, size: int) -> list[list]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]
