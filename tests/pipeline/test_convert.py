"""COCO -> shards on real parts: coco128 to a local folder and to a moto S3 server, bad inputs built
with PIL, resume, and the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline import coco, retry, shards, storage
from pipeline import format as fmt

ROOT = Path(__file__).resolve().parents[2]
COCO_JSON = "annotations/instances_train2017.json"
COCO_IMAGES = "images/train2017"


def convert(ann: Path, images: Path, output: str, **kw) -> shards.ConversionReport:
    options = shards.ShardOptions(**{"progress": False, "workers": 2, **kw})
    return shards.write_shards(coco.load_coco(ann), images, output, options)


def read_samples(output: str, manifest: dict) -> dict[int, tuple[bytes, dict]]:
    """image id -> (jpeg bytes, record), checking member names, order and the manifest's counts on the way."""
    samples: dict[int, tuple[bytes, dict]] = {}
    for shard in manifest["shards"]:
        data = storage.read_bytes(storage.join(output, shard["name"]))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        assert len(members) == 2 * shard["num_images"] and len(data) == shard["num_bytes"]
        assert sum(len(json.loads(r)["boxes"]) for _, r in members[1::2]) == shard["num_boxes"]
        for (jpg_name, jpg), (rec_name, rec) in zip(members[::2], members[1::2], strict=True):
            record = json.loads(rec)
            key = fmt.sample_key(record["image_id"])
            assert (jpg_name, rec_name) == (f"{key}.jpg", f"{key}.json")
            samples[record["image_id"]] = (jpg, record)
        keys = [json.loads(r)["image_id"] for _, r in members[1::2]]
        assert keys == sorted(keys)
    return samples


def expected_records(annotations: dict) -> tuple[dict[int, dict], int]:
    """The records computed independently from the raw json (xywh -> xyxy, clipped to the image), and the
    number of boxes clipping changed."""
    labels = {cid: i for i, cid in enumerate(sorted(c["id"] for c in annotations["categories"]))}
    clipped = 0
    out = {
        im["id"]: {"image_id": im["id"], "file_name": im["file_name"], "width": im["width"], "height": im["height"],
                   "boxes": [], "category_ids": [], "labels": [], "iscrowd": []}
        for im in annotations["images"]
    }  # fmt: skip
    for a in sorted(annotations["annotations"], key=lambda a: (a["image_id"], a["id"])):
        rec = out[a["image_id"]]
        x, y, w, h = a["bbox"]
        box = [min(max(x, 0), rec["width"]), min(max(y, 0), rec["height"])]
        box += [min(max(x + w, 0), rec["width"]), min(max(y + h, 0), rec["height"])]
        rec["boxes"].append(box)
        clipped += box != [x, y, x + w, y + h]
        rec["category_ids"].append(a["category_id"])
        rec["labels"].append(labels[a["category_id"]])
        rec["iscrowd"].append(a["iscrowd"])
    return out, clipped


@pytest.mark.parametrize("where", ["local", "s3"])
def test_coco128_round_trip(where: str, coco128: Path, tmp_path: Path, request) -> None:
    output = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/coco128"
    report = convert(coco128 / COCO_JSON, coco128 / COCO_IMAGES, output, shard_images=50, prefix="c128")
    manifest = json.loads(storage.read_bytes(storage.join(output, fmt.MANIFEST)))
    assert manifest == report.manifest
    assert [s["name"] for s in manifest["shards"]] == ["c128-000000.tar", "c128-000001.tar", "c128-000002.tar"]
    assert [s["num_images"] for s in manifest["shards"]] == [50, 50, 28]
    assert (manifest["num_images"], manifest["num_boxes"]) == (128, 929)
    assert manifest["skipped_images"] == [] and manifest["dropped_boxes"] == []
    assert manifest["format"] == fmt.FORMAT and manifest["ground_truth"] == fmt.GROUND_TRUTH
    assert [c["label"] for c in manifest["categories"]] == list(range(80))
    assert [c["id"] for c in manifest["categories"]] == sorted(c["id"] for c in manifest["categories"])

    raw = json.loads((coco128 / COCO_JSON).read_text())
    samples = read_samples(output, manifest)
    expected, clipped = expected_records(raw)
    assert sorted(samples) == sorted(expected)
    for image_id, (jpg, record) in samples.items():
        assert jpg == (coco128 / COCO_IMAGES / record["file_name"]).read_bytes()  # never re-encoded
        assert record == expected[image_id]
    assert manifest["num_clipped_boxes"] == clipped > 0

    gray = next(im for im in raw["images"] if Image.open(coco128 / COCO_IMAGES / im["file_name"]).mode == "L")
    assert Image.open(io.BytesIO(samples[gray["id"]][0])).mode == "L"  # kept as it is

    gt_path = tmp_path / "gt.json"
    gt_path.write_bytes(storage.read_bytes(storage.join(output, fmt.GROUND_TRUTH)))
    gt = COCO(str(gt_path))
    assert len(gt.getImgIds()) == 128 and len(gt.getAnnIds()) == 929 and len(gt.getCatIds()) == 80
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[1]))[0]
    x1, y1, x2, y2 = samples[1][1]["boxes"][0]
    assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])


def jpeg_bytes(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture
def bad_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Eight images (good, grayscale, PNG, corrupt, truncated, wrong size, missing, no boxes) and bad boxes."""
    images = tmp_path / "images"
    images.mkdir()
    good = jpeg_bytes(64, 48)
    (images / "good.jpg").write_bytes(good)
    (images / "gray.jpg").write_bytes(jpeg_bytes(40, 30, "L"))
    Image.new("RGBA", (32, 24), (200, 10, 10, 128)).save(images / "pic.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "wrongsize.jpg").write_bytes(jpeg_bytes(64, 48, seed=1))
    (images / "empty.jpg").write_bytes(jpeg_bytes(16, 16, seed=2))
    sizes = {"good.jpg": (64, 48), "gray.jpg": (40, 30), "pic.png": (32, 24), "corrupt.jpg": (64, 48),
             "truncated.jpg": (64, 48), "wrongsize.jpg": (100, 100), "missing.jpg": (64, 48),
             "empty.jpg": (16, 16)}  # fmt: skip
    ann = {
        "images": [
            {"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, (w, h)) in enumerate(sizes.items())
        ],
        "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0, "area": 300.0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [50, 40, 30, 30], "iscrowd": 1},  # clipped
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [5, 5, 1e-4, 10], "iscrowd": 0},  # too thin
            {"id": 14, "image_id": 1, "category_id": 3, "bbox": [70, 5, 10, 10], "iscrowd": 0},  # outside
            {"id": 15, "image_id": 1, "category_id": 3, "bbox": [5, 5, math.nan, 10], "iscrowd": 0},
            {"id": 16, "image_id": 1, "category_id": 99, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 17, "image_id": 2, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 18, "image_id": 3, "category_id": 7, "bbox": [0, 0, 32, 24], "iscrowd": 0},
            {"id": 19, "image_id": 4, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))  # json writes NaN, as some real exports do
    return path, images


def test_bad_images_and_boxes(bad_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = bad_dataset
    output = str(tmp_path / "out")
    manifest = convert(ann, images, output, shard_images=3).manifest
    skipped = {s["file_name"]: s["reason"] for s in manifest["skipped_images"]}
    assert sorted(skipped) == ["corrupt.jpg", "missing.jpg", "truncated.jpg", "wrongsize.jpg"]
    assert "undecodable" in skipped["corrupt.jpg"] and "truncated" in skipped["truncated.jpg"]
    assert "64x48 differs from the annotation's 100x100" in skipped["wrongsize.jpg"]
    assert "cannot read" in skipped["missing.jpg"]
    dropped = {d["annotation_id"]: d["reason"] for d in manifest["dropped_boxes"]}
    assert sorted(dropped) == [12, 13, 14, 15, 16]
    assert "degenerate" in dropped[12] and "degenerate" in dropped[13] and "after clipping" in dropped[14]
    assert "non-finite" in dropped[15] and "unknown category id 99" in dropped[16]
    assert manifest["num_clipped_boxes"] == 1
    assert manifest["categories"] == [{"id": 3, "name": "a", "label": 0}, {"id": 7, "name": "b", "label": 1}]
    assert [s["num_images"] for s in manifest["shards"]] == [3, 0, 1]  # skipped images keep their slots
    assert (manifest["num_images"], manifest["num_boxes"]) == (4, 4)  # box 19 is on the corrupt image

    samples = read_samples(output, manifest)
    assert sorted(samples) == [1, 2, 3, 8]
    good_jpg, good = samples[1]
    assert good_jpg == (images / "good.jpg").read_bytes()
    assert good["boxes"] == [[10.0, 10.0, 30.0, 30.0], [50.0, 40.0, 64.0, 48.0]]
    assert (good["labels"], good["category_ids"], good["iscrowd"]) == ([0, 1], [3, 7], [0, 1])
    assert samples[2][0] == (images / "gray.jpg").read_bytes()
    png_as_jpeg = Image.open(io.BytesIO(samples[3][0]))
    assert (png_as_jpeg.format, png_as_jpeg.mode, png_as_jpeg.size) == ("JPEG", "RGB", (32, 24))
    assert samples[8][1]["boxes"] == [] and samples[8][1]["labels"] == []  # a valid negative

    (tmp_path / "gt.json").write_bytes(storage.read_bytes(storage.join(output, fmt.GROUND_TRUTH)))
    gt = COCO(str(tmp_path / "gt.json"))
    assert sorted(gt.getImgIds()) == [1, 2, 3, 8] and sorted(gt.getAnnIds()) == [10, 11, 17, 18]
    assert gt.anns[11]["bbox"] == [50.0, 40.0, 14.0, 8.0] and gt.anns[10]["area"] == 300.0


def test_rerun_writes_nothing_and_restores_a_deleted_shard(coco128: Path, tmp_path: Path, monkeypatch) -> None:
    output = str(tmp_path / "out")
    first = convert(coco128 / COCO_JSON, coco128 / COCO_IMAGES, output, shard_images=50)
    assert first.num_written_shards == 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()}
    writes: list[str] = []
    real_write = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (writes.append(uri), real_write(uri, data)))

    again = convert(coco128 / COCO_JSON, coco128 / COCO_IMAGES, output, shard_images=50)
    assert writes == [] and again.num_written_shards == 0 and again.manifest == first.manifest
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir()} == before

    (tmp_path / "out" / "shard-000001.tar").unlink()
    convert(coco128 / COCO_JSON, coco128 / COCO_IMAGES, output, shard_images=50, workers=3)
    assert writes == [storage.join(output, "shard-000001.tar")]
    assert (tmp_path / "out" / "shard-000001.tar").read_bytes() == before["shard-000001.tar"][1]

    with pytest.raises(shards.ShardConflictError, match=r"shard-000000\.tar already exists"):
        convert(coco128 / COCO_JSON, coco128 / COCO_IMAGES, output, shard_images=60)


def test_shard_bytes_limit_is_deterministic(coco128: Path) -> None:
    dataset = coco.load_coco(coco128 / COCO_JSON)
    limit = 2_000_000
    plan = shards.plan_shards(dataset.images, coco128 / COCO_IMAGES, shard_images=1000, shard_bytes=limit)
    assert plan == shards.plan_shards(dataset.images, coco128 / COCO_IMAGES, shard_images=1000, shard_bytes=limit)
    assert [im for shard in plan for im in shard] == dataset.images
    est = [sum((coco128 / COCO_IMAGES / im.file_name).stat().st_size + shards.TAR_OVERHEAD_PER_SAMPLE for im in s)
           for s in plan]  # fmt: skip
    assert len(plan) > 5 and all(e <= limit for e in est)
    counted = shards.plan_shards(dataset.images, coco128 / COCO_IMAGES, shard_images=10, shard_bytes=limit)
    assert max(len(s) for s in counted) == 10 and len(counted) >= len(plan)  # whichever limit comes first


def test_unknown_bucket_names_the_uri(s3_endpoint: str, monkeypatch) -> None:
    monkeypatch.setitem(retry._settings, "window_s", 0.5)  # a test-sized retry window
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-4242/shards.*does not exist"):
        storage.ensure_reachable("s3://no-such-bucket-4242/shards")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not a COCO detection file"),
        ({"images": [], "annotations": []}, "missing key.*categories"),
        ({"images": [], "categories": [], "annotations": [{"id": 1, "image_id": 1, "caption": "a"}]}, "no annotation"),
        ({"images": [{"id": 1}], "categories": [], "annotations": []}, "lacks file_name, width, height"),
        (
            {"images": [{"id": 1, "file_name": "a", "width": 2, "height": 2}] * 2, "categories": [], "annotations": []},
            "appears twice",
        ),
        ({"images": "x", "categories": [], "annotations": []}, "'images' must be a list"),
    ],
)
def test_bad_json_is_a_value_error(data, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        coco.parse_coco(data, source="a.json")


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="shard_images"):
        shards.ShardOptions(shard_images=0)
    with pytest.raises(ValueError, match="prefix"):
        shards.ShardOptions(prefix="a/b")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "convert.py"), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd="/",
    )  # fmt: skip


def test_cli_end_to_end(bad_dataset: tuple[Path, Path], tmp_path: Path) -> None:
    ann, images = bad_dataset
    out = tmp_path / "cli-out"
    args = ["--annotations", str(ann), "--images", str(images), "--shard-images", "2", "--shard-bytes", "1MB"]
    done = run_cli(*args, "--output", f"file://{out}", "--prefix", "syn", "--workers", "3")
    assert done.returncode == 0, done.stderr
    assert "wrote 4 images with 4 boxes in 4 shards (4 written now" in done.stdout
    assert "skipped images: 4" in done.stdout and "wrongsize.jpg: decoded size" in done.stdout
    assert "dropped boxes: 5" in done.stdout and "converted to JPEG: 1 images; clipped boxes: 1" in done.stdout
    assert f"manifest: file://{out}/manifest.json" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [fmt.GROUND_TRUTH, fmt.MANIFEST] + [
        fmt.shard_name("syn", i) for i in range(4)
    ]
    again = run_cli(*args, "--output", f"file://{out}", "--prefix", "syn", "--no-progress")
    assert again.returncode == 0 and "(0 written now, 4 already there)" in again.stdout


def test_cli_errors_are_clear(bad_dataset: tuple[Path, Path], tmp_path: Path, s3_endpoint: str) -> None:
    ann, images = bad_dataset
    out = str(tmp_path / "o")
    cases = [
        (["--annotations", str(tmp_path / "nope.json"), "--images", str(images), "--output", out],
         "annotations file .*nope.json does not exist"),
        (["--annotations", str(ann), "--images", str(tmp_path / "nodir"), "--output", out],
         "images folder .*nodir does not exist"),
        (["--annotations", str(images / "good.jpg"), "--images", str(images), "--output", out], "not valid JSON"),
        (["--annotations", str(ann), "--images", str(images), "--output", out, "--shard-bytes", "lots"],
         "not a size in bytes: 'lots'"),
        (["--annotations", str(ann), "--images", str(images), "--output", out, "--workers", "0"],
         "expected a positive integer"),
        (["--annotations", str(ann), "--images", str(images)], "required: --output"),
        (["--annotations", str(ann), "--images", str(images), "--output", "s3://no-such-bucket-4242/x"],
         "checking s3://no-such-bucket-4242/x failed.*bucket"),
    ]  # fmt: skip
    for args, message in cases:
        done = run_cli(*args)
        assert done.returncode != 0, args
        assert "Traceback" not in done.stderr, done.stderr
        assert re.search(message, done.stderr), (message, done.stderr)
    assert not Path(out).exists()
