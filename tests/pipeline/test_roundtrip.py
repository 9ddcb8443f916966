"""coco128 end to end: convert -> S3-protocol server (moto_server) -> stream -> DALI (CPU) -> Batch."""

from __future__ import annotations

import json

import torch

from pipeline import storage
from pipeline.coco import load_coco
from pipeline.dali import AugmentConfig
from pipeline.loader import DetectionLoader, LoaderConfig, open_dataset
from pipeline.shards import ShardOptions, write_shards


def test_coco128_through_s3_and_dali(coco128, s3_bucket: str) -> None:
    uri = f"{s3_bucket}/coco128"
    dataset = load_coco(coco128 / "annotations" / "instances_train2017.json")
    write_shards(
        dataset, coco128 / "images" / "train2017", uri, ShardOptions(shard_images=32, workers=2, progress=False)
    )
    ds = open_dataset(uri)
    assert len(ds.shards) == 4 and ds.num_classes == 80
    truth = json.loads(storage.read_bytes(ds.ground_truth_uri))
    gt_by_image: dict[int, list] = {}
    for ann in truth["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    label_of = {cid: label for label, cid in enumerate(ds.category_ids())}

    aug = AugmentConfig(train_sizes=(320,), eval_size=320, max_size=640)
    loader = DetectionLoader(ds, rank=0, world_size=2, train=False, cfg=LoaderConfig(batch_size=4, aug=aug))
    other = DetectionLoader(ds, rank=1, world_size=2, train=False, cfg=LoaderConfig(batch_size=4, aug=aug))
    seen = []
    for batch in [*loader, *other]:
        assert batch.images.shape[1] == 3 and batch.images.shape[-1] % 128 == 0
        for i, image_id in enumerate(batch.image_ids.tolist()):
            seen.append(image_id)
            anns = [a for a in gt_by_image.get(image_id, []) if not a["iscrowd"]]
            n = int(batch.num_boxes[i])
            assert n == len(anns)
            if n:
                h, w = batch.image_sizes[i].tolist()
                oh, ow = batch.original_sizes[i].tolist()
                xywh = torch.tensor([a["bbox"] for a in anns])
                xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * torch.tensor([w / ow, h / oh] * 2)
                torch.testing.assert_close(batch.boxes[i, :n], xyxy, atol=1e-3, rtol=1e-5)
                assert batch.labels[i, :n].tolist() == [label_of[a["category_id"]] for a in anns]
    assert sorted(seen) == sorted(im["id"] for im in truth["images"])  # each image once over both ranks
    assert len(seen) == 128
