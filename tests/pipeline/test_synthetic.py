"""The synthetic shapes dataset: same bytes per seed, exact boxes, COCO-valid, spread, and it streams."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pipeline import synthetic
from pipeline.coco import load_coco
from pipeline.dali import AugmentConfig
from pipeline.loader import DetectionLoader, LoaderConfig, open_dataset
from pipeline.shards import ShardOptions, write_shards

ROOT = Path(__file__).resolve().parents[2]
NUM_TRAIN, NUM_VAL, SIZE = 60, 20, 256


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, synthetic.generate(out, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=3)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path) -> None:
    out, summary = data
    again = synthetic.generate(tmp_path / "a", num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=3)
    assert again == summary
    assert tree_bytes(tmp_path / "a") == tree_bytes(out)
    synthetic.generate(tmp_path / "b", num_train=3, num_val=0, image_size=SIZE, seed=4)
    assert (tmp_path / "b/train/images/000000.jpg").read_bytes() != (out / "train/images/000000.jpg").read_bytes()
    # Image i does not depend on how many images are asked for.
    synthetic.generate(tmp_path / "c", num_train=3, num_val=0, image_size=SIZE, seed=3)
    assert (tmp_path / "c/train/images/000002.jpg").read_bytes() == (out / "train/images/000002.jpg").read_bytes()


def test_val_is_a_different_stream(data) -> None:
    out, _ = data
    train = {p.read_bytes() for p in (out / "train/images").iterdir()}
    assert not train & {p.read_bytes() for p in (out / "val/images").iterdir()}


@pytest.mark.parametrize("classes", sorted(synthetic.CLASS_SETS))
def test_boxes_are_the_exact_extent_of_the_drawn_pixels(classes: str) -> None:
    seen = set()
    for i in range(40):
        scene = synthetic.render(np.random.default_rng([5, 0, i]), 128, synthetic.class_set(classes))
        seen |= {obj.category_id for obj in scene.objects}
        for k, obj in enumerate(scene.objects, start=1):
            x, y, w, h = obj.bbox
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1
            ys, xs = np.nonzero(scene.instances == k)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert obj.area == len(xs)
    assert seen == set(range(1, len(synthetic.class_set(classes)) + 1))


def test_objects_stand_out_from_the_background_in_the_jpeg(data) -> None:
    """Each object's pixels (in the written JPEG) differ in colour from the background just outside its box."""
    out, _ = data
    coco = json.loads((out / "train/annotations.json").read_text())
    checked = 0
    for i in range(10):
        scene = synthetic.render(np.random.default_rng([3, 0, i]), SIZE)  # image i of the fixture's train split
        anns = [a for a in coco["annotations"] if a["image_id"] == i + 1]
        assert [(a["bbox"], a["area"]) for a in anns] == [(o.bbox, o.area) for o in scene.objects]
        pixels = np.asarray(Image.open(out / "train/images" / f"{i:06d}.jpg"), dtype=np.float32)
        for k, obj in enumerate(scene.objects, start=1):
            x, y, w, h = obj.bbox
            frame = np.zeros((SIZE, SIZE), bool)
            frame[max(y - 3, 0) : y + h + 3, max(x - 3, 0) : x + w + 3] = True
            frame[y : y + h, x : x + w] = False
            frame &= scene.instances == 0
            if frame.sum() < 10:
                continue
            distance = np.abs(pixels[scene.instances == k].mean(0) - pixels[frame].mean(0)).sum()
            assert distance > 40, (i, obj, distance)
            checked += 1
    assert checked >= 20


def test_coco_json_loads_in_pycocotools(data) -> None:
    out, summary = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "val/annotations.json"))
    assert len(gt.getImgIds()) == NUM_VAL
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == [n for n, _ in synthetic.CLASSES]
    assert len(gt.getAnnIds()) == summary["val"]["num_objects"]
    for ann in gt.loadAnns(gt.getAnnIds()):
        assert ann["iscrowd"] == 0 and ann["area"] > 0 and ann["category_id"] in gt.getCatIds()
        assert ann["bbox"][2] * ann["bbox"][3] >= ann["area"]


def test_classes_sizes_and_empty_images_are_spread() -> None:
    coco: dict = {"images": [], "annotations": [], "categories": synthetic.categories()}
    for i in range(200):
        scene = synthetic.render(np.random.default_rng([0, 0, i]), SIZE)
        coco["images"].append({"id": i + 1})
        for obj in scene.objects:
            coco["annotations"].append(
                {"image_id": i + 1, "category_id": obj.category_id, "bbox": obj.bbox, "area": obj.area}
            )
    s = synthetic.summarize(coco)
    assert set(s["objects_per_class"]) == {n for n, _ in synthetic.CLASSES}
    assert min(s["objects_per_class"].values()) > 0.1 * s["num_objects"]
    ranges = s["objects_per_area_range"]
    assert ranges["small"] > 0.3 * s["num_objects"] and ranges["medium"] > 0.2 * s["num_objects"]
    assert ranges["large"] > 0.02 * s["num_objects"]
    assert 0 < s["num_zero_object_images"] < 0.15 * len(coco["images"])
    assert max(s["objects_per_image"]) == synthetic.MAX_OBJECTS
    sides = [max(a["bbox"][2:]) for a in coco["annotations"]]
    assert min(sides) >= synthetic.MIN_SIDE - 1 and max(sides) <= synthetic.MAX_SIDE_FRACTION * SIZE


def test_converts_to_shards_and_streams_through_the_loader(data, tmp_path) -> None:
    out, _ = data
    dataset = load_coco(out / "train/annotations.json")
    assert not dataset.dropped_boxes and dataset.num_clipped_boxes == 0
    uri = str(tmp_path / "shards")
    report = write_shards(dataset, out / "train/images", uri, ShardOptions(shard_images=25, progress=False))
    assert report.manifest["num_images"] == NUM_TRAIN and not report.manifest["skipped_images"]
    ds = open_dataset(uri)
    assert ds.num_classes == len(synthetic.CLASSES) and len(ds.shards) == 3
    records = {im.image_id: im for im in dataset.images}
    aug = AugmentConfig(train_sizes=(SIZE,), eval_size=SIZE, max_size=SIZE)
    loader = DetectionLoader(ds, rank=0, world_size=1, train=False, cfg=LoaderConfig(batch_size=8, aug=aug))
    seen = 0
    for batch in loader:
        for i, image_id in enumerate(batch.image_ids.tolist()):
            rec = records[image_id]
            n = int(batch.num_boxes[i])
            assert n == len(rec.boxes)
            torch.testing.assert_close(batch.boxes[i, :n], torch.tensor(rec.boxes).reshape(-1, 4), atol=1e-3, rtol=0)
            assert batch.labels[i, :n].tolist() == rec.labels
            seen += 1
    assert seen == NUM_TRAIN


def test_preview_and_cli(tmp_path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/make_synthetic.py"), "--output", str(out), "--train", "6", "--val", "2",
         "--size", "128", "--seed", "1", "--preview", "4"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "train: 6 images" in proc.stdout and "val: 2 images" in proc.stdout
    with Image.open(out / "preview.png") as im:
        assert im.size == (4 * 256 + 3 * 4, 256)
    assert len(list((out / "train/images").glob("*.jpg"))) == 6
    bad = subprocess.run(
        [sys.executable, str(ROOT / "jobs/make_synthetic.py"), "--output", str(out), "--size", "16"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "image_size" in bad.stderr
