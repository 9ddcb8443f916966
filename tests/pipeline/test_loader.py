"""Streaming shards through DALI (CPU) into batches: exact boxes, coverage, resume and bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline import retry, storage
from pipeline.dali import MEAN, STD, AugmentConfig
from pipeline.loader import DetectionLoader, LoaderConfig, open_dataset
from pipeline.reader import shards_for
from tests.pipeline.shard_util import coco_records, split, tar_bytes, write_dataset

SMALL = AugmentConfig(train_sizes=(256,), eval_size=256, max_size=512)


@pytest.fixture(scope="module")
def coco40(coco128, tmp_path_factory):
    """40 coco128 images in 8 local shards of 5."""
    samples, cats = coco_records(coco128, 40)
    uri = str(tmp_path_factory.mktemp("coco40"))
    write_dataset(uri, [tar_bytes(s) for s in split(samples, 5)], cats)
    return uri, {r["image_id"]: r for _, r in samples}


def test_boxes_follow_flip_and_resize_exactly(coco40) -> None:
    uri, records = coco40
    ds = open_dataset(uri)
    cfg = LoaderConfig(batch_size=4, num_workers=1, aug=SMALL)
    plain = list(DetectionLoader(ds, rank=0, world_size=1, train=False, cfg=cfg))
    flip_cfg = LoaderConfig(
        batch_size=4, num_workers=1, shuffle_buffer=1, aug=AugmentConfig(**{**vars(SMALL), "flip_prob": 1.0})
    )
    flipped = DetectionLoader(ds, rank=0, world_size=1, train=True, cfg=flip_cfg)
    by_id = {}
    for batch in plain:
        for i, image_id in enumerate(batch.image_ids.tolist()):
            by_id[image_id] = (batch, i)
    for batch, _ in zip(flipped, range(10), strict=False):
        assert batch.flipped.all()
        for i, image_id in enumerate(batch.image_ids.tolist()):
            rec = records[image_id]
            h, w = batch.image_sizes[i].tolist()
            sx, sy = w / rec["width"], h / rec["height"]
            assert min(h, w) == 256 or max(h, w) == 512  # shorter side 256 unless the longer side caps
            n = batch.num_boxes[i]
            expected = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4)
            mirrored = torch.stack(
                [w - expected[:, 2] * sx, expected[:, 1] * sy, w - expected[:, 0] * sx, expected[:, 3] * sy], 1
            )
            torch.testing.assert_close(batch.boxes[i, :n], mirrored, atol=1e-3, rtol=1e-5)
            assert batch.labels[i, :n].tolist() == rec["labels"]
            ref_batch, j = by_id[image_id]
            assert torch.equal(ref_batch.image_sizes[j], batch.image_sizes[i])
            plain_boxes = ref_batch.boxes[j, :n]
            torch.testing.assert_close(plain_boxes, expected * torch.tensor([sx, sy, sx, sy]), atol=1e-3, rtol=1e-5)
            # The pixels are mirrored too: same image, same resize.
            torch.testing.assert_close(batch.images[i, :, :h, :w], ref_batch.images[j, :, :h, :w].flip(-1))
            assert not batch.images[i, :, h:, :].any() and not batch.images[i, :, :, w:].any()  # zero padding


def test_batches_are_padded_to_128_and_grayscale_becomes_rgb(coco40) -> None:
    uri, records = coco40
    gray_id = 17  # coco128's one grayscale JPEG (000000000086.jpg)
    assert gray_id in records
    loader = DetectionLoader(
        open_dataset(uri), rank=0, world_size=1, train=False, cfg=LoaderConfig(batch_size=3, aug=SMALL)
    )
    for batch in loader:
        assert batch.images.shape[1] == 3 and batch.images.shape[2] % 128 == 0 and batch.images.shape[3] % 128 == 0
        assert batch.images.dtype == torch.float32
        if gray_id in batch.image_ids.tolist():
            i = batch.image_ids.tolist().index(gray_id)
            h, w = batch.image_sizes[i].tolist()
            pixels = batch.images[i, :, :h, :w] * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
            torch.testing.assert_close(pixels[0], pixels[1], atol=1e-3, rtol=0)
            torch.testing.assert_close(pixels[1], pixels[2], atol=1e-3, rtol=0)
            return
    pytest.fail("grayscale image not seen")


def test_training_split_is_disjoint_over_3_ranks_x_2_workers() -> None:
    shards = [f"s-{i}" for i in range(15)]
    for epoch in range(3):
        parts = [shards_for(shards, g, 6, epoch, seed=1, train=True) for g in range(6)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == sorted(shards)  # disjoint and complete
    assert shards_for(shards, 0, 6, 0, 1, True) != shards_for(shards, 0, 6, 1, 1, True)  # reshuffled per epoch
    few = [shards_for(shards[:4], g, 6, 0, 1, True) for g in range(6)]
    assert all(len(p) == 1 for p in few)  # nobody idles with fewer shards than readers


def test_evaluation_reads_every_image_once_across_3_ranks_x_2_workers(coco40) -> None:
    uri, records = coco40
    ds = open_dataset(uri)
    seen = []
    for rank in range(3):
        for batch in DetectionLoader(
            ds, rank=rank, world_size=3, train=False, cfg=LoaderConfig(batch_size=4, num_workers=2, aug=SMALL)
        ):
            seen += batch.image_ids.tolist()
    assert sorted(seen) == sorted(records)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_neither_replays_nor_skips(coco40, workers: int) -> None:
    uri, records = coco40
    ds = open_dataset(uri)
    cfg = LoaderConfig(batch_size=4, num_workers=workers, shuffle_buffer=8, aug=SMALL)

    def take(loader: DetectionLoader, count: int, state: dict | None = None) -> tuple[list[int], dict]:
        if state:
            loader.load_state_dict(state)
        ids: list[int] = []
        for batch in loader:
            ids += batch.image_ids.tolist()
            if len(ids) >= count:
                break
        return ids, loader.state_dict()

    # DALI has pulled batches ahead when the state is taken: the state must still be the 12th image's.
    first, state = take(DetectionLoader(ds, rank=0, world_size=1, train=True, cfg=cfg), 12)
    rest, _ = take(DetectionLoader(ds, rank=0, world_size=1, train=True, cfg=cfg), 40 - 12, state)
    assert len(first) == 12
    assert sorted(first + rest) == sorted(records), "resumed epoch must hold every image exactly once"


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(coco128, tmp_path, caplog) -> None:
    samples, cats = coco_records(coco128, 12)
    broken = list(samples[:6])
    jpeg, rec = broken[1]
    broken[1] = (jpeg[: len(jpeg) // 2], rec)  # truncated JPEG
    jpeg, rec = broken[3]
    broken[3] = (b"\xff\xd8" + np.random.default_rng(0).bytes(5000) + b"\xff\xd9", rec)  # garbage
    truncated_tar = tar_bytes(samples[6:12])
    truncated_tar = truncated_tar[: len(truncated_tar) // 2]
    uri = str(tmp_path / "bad")
    write_dataset(uri, [tar_bytes(broken), truncated_tar], cats)
    loader = DetectionLoader(
        open_dataset(uri), rank=0, world_size=1, train=False, cfg=LoaderConfig(batch_size=2, num_workers=1, aug=SMALL)
    )
    with caplog.at_level(logging.WARNING):
        ids = [i for b in loader for i in b.image_ids.tolist()]
    bad = {samples[1][1]["image_id"], samples[3][1]["image_id"]}
    assert not bad & set(ids)
    assert {r["image_id"] for _, r in broken} - bad <= set(ids)
    assert 0 < len(set(ids) & {r["image_id"] for _, r in samples[6:12]}) < 6  # the shard's first half
    assert loader.stats["corrupt_images"] == 2 and loader.stats["truncated_shards"] == 1
    assert f"{samples[1][1]['image_id']:012d}" in caplog.text and "truncated" in caplog.text


def test_no_dataset_and_no_shards_are_errors_before_work(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no manifest\.json.*jobs/convert\.py"):
        open_dataset(str(tmp_path))
    write_dataset(str(tmp_path / "empty"), [], [])
    with pytest.raises(ValueError, match="lists no shards"):
        open_dataset(str(tmp_path / "empty"))


def test_unreachable_bucket_is_named(monkeypatch) -> None:
    monkeypatch.setitem(retry._settings, "window_s", 0.5)  # a test-sized retry window
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(storage.StorageError, match="s3://nowhere/data"):
        open_dataset("s3://nowhere/data")


def test_random_iou_crop_keeps_boxes_on_their_pixels(tmp_path) -> None:
    """A red rectangle on grey: after crop, flip and resize, the box still frames red pixels."""
    import io

    from PIL import Image

    canvas = Image.new("RGB", (400, 300), (128, 128, 128))
    canvas.paste((255, 0, 0), (100, 80, 220, 200))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=95)
    record = {"image_id": 1, "file_name": "r.jpg", "width": 400, "height": 300, "boxes": [[100.0, 80.0, 220.0, 200.0]],
              "category_ids": [1], "labels": [0], "iscrowd": [0]}  # fmt: skip
    uri = str(tmp_path / "crop")
    write_dataset(uri, [tar_bytes([(buf.getvalue(), record)])], [{"id": 1, "name": "red", "label": 0}])
    aug = AugmentConfig(train_sizes=(256,), eval_size=256, max_size=512, iou_crop=True)
    loader = DetectionLoader(
        open_dataset(uri), rank=0, world_size=1, train=True, cfg=LoaderConfig(batch_size=1, aug=aug)
    )
    sizes = set()
    for batch, _ in zip(loader, range(40), strict=False):
        h, w = batch.image_sizes[0].tolist()
        sizes.add((h, w))
        assert batch.num_boxes[0] == 1  # the crop keeps the box's centre
        x1, y1, x2, y2 = batch.boxes[0, 0].tolist()
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        red = batch.images[0, 0] * STD[0] + MEAN[0]  # the red channel, 0..255
        inside = red[int(y1) + 3 : int(y2) - 3, int(x1) + 3 : int(x2) - 3]
        assert inside.numel() and inside.min() > 200
        if x1 > 6:  # grey just left of the box
            assert red[int(y1) + 3 : int(y2) - 3, int(x1) - 5].max() < 160
    assert len(sizes) > 3  # the crops differ


def test_static_shapes_pad_every_training_batch_alike(coco40) -> None:
    """``aug.pad_to`` + ``pad_boxes_to``: every training batch has the same image and box shapes (one
    graph for torch.compile, replayable CUDA graphs), with the boxes unchanged; evaluation keeps its own."""
    uri, records = coco40
    ds = open_dataset(uri)
    aug = AugmentConfig(train_sizes=(192, 224, 256), eval_size=256, max_size=384, pad_to=384)
    cfg = LoaderConfig(batch_size=3, num_workers=2, pad_boxes_to=64, aug=aug)
    shapes = set()
    for batch, _ in zip(DetectionLoader(ds, rank=0, world_size=1, train=True, cfg=cfg), range(12), strict=False):
        shapes.add((tuple(batch.images.shape), tuple(batch.boxes.shape), tuple(batch.labels.shape)))
        for i, image_id in enumerate(batch.image_ids.tolist()):
            n, (h, w) = int(batch.num_boxes[i]), batch.image_sizes[i].tolist()
            assert n == len(records[image_id]["labels"]) and max(h, w) <= 384
            assert (batch.labels[i, n:] == -1).all() and (batch.images[i, :, h:, :] == 0).all()
    assert shapes == {((3, 3, 384, 384), (3, 64, 4), (3, 64))}
    plain = LoaderConfig(batch_size=3, num_workers=2, aug=aug)
    evaluated = next(iter(DetectionLoader(ds, rank=0, world_size=1, train=False, cfg=plain)))
    assert evaluated.images.shape[-2:] != (384, 384) and evaluated.boxes.shape[1] == int(evaluated.num_boxes.max())


def test_more_boxes_than_pad_boxes_to_are_all_kept(coco40) -> None:
    uri, records = coco40
    cfg = LoaderConfig(batch_size=4, num_workers=1, pad_boxes_to=1, aug=SMALL)
    batch = next(iter(DetectionLoader(open_dataset(uri), rank=0, world_size=1, train=False, cfg=cfg)))
    counts = [len(records[i]["labels"]) for i in batch.image_ids.tolist()]
    assert batch.num_boxes.tolist() == counts and batch.boxes.shape[1] == max(counts) > 1


@pytest.mark.parametrize(("pad_to", "fix"), [(500, "512"), (256, "512"), (-128, "512")])
def test_bad_pad_to_is_refused_with_a_size_that_works(pad_to: int, fix: str) -> None:
    with pytest.raises(ValueError, match=f"pad_to must be 0 or a multiple of 128.*e.g. {fix}"):
        AugmentConfig(train_sizes=(256,), eval_size=256, max_size=512, pad_to=pad_to)
    with pytest.raises(ValueError, match="pad_boxes_to must be >= 0"):
        LoaderConfig(pad_boxes_to=-1)


def test_label_outside_the_manifest_stops_with_the_image_named(coco128, tmp_path) -> None:
    """The loader checks labels on the host (the training step does not, to stay free of host syncs)."""
    samples, cats = coco_records(coco128, 4)
    jpeg, record = samples[2]
    samples[2] = (jpeg, {**record, "labels": [len(cats) + 3, *record["labels"][1:]]})
    write_dataset(str(tmp_path), [tar_bytes(samples)], cats)
    cfg = LoaderConfig(batch_size=2, num_workers=1, aug=SMALL)
    loader = DetectionLoader(open_dataset(str(tmp_path)), rank=0, world_size=1, train=False, cfg=cfg)
    with pytest.raises(ValueError, match=rf"image {record['image_id']} .*label {len(cats) + 3}, outside .*reconvert"):
        list(loader)


def test_box_outside_the_image_is_dropped_and_counted(coco128, tmp_path, caplog) -> None:
    samples, cats = coco_records(coco128, 2)
    jpeg, record = samples[0]
    w, h = record["width"], record["height"]
    outside = [w + 10.0, 5.0, w + 50.0, h / 2]  # right of the image: no area left after clipping
    samples[0] = (jpeg, {**record, "boxes": [outside] + record["boxes"], "labels": [0] + record["labels"],
                         "iscrowd": [0] + record["iscrowd"], "category_ids": [1] + record["category_ids"]})  # fmt: skip
    write_dataset(str(tmp_path), [tar_bytes(samples)], cats)
    cfg = LoaderConfig(batch_size=2, num_workers=1, aug=SMALL)
    loader = DetectionLoader(open_dataset(str(tmp_path)), rank=0, world_size=1, train=False, cfg=cfg)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(loader)
    i = batch.image_ids.tolist().index(record["image_id"])
    assert int(batch.num_boxes[i]) == len(record["labels"]) and loader.stats["dropped_boxes"] == 1
    assert "outside the image" in caplog.text
