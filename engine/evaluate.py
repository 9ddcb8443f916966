"""Distributed COCO evaluation: each rank predicts on its own shards (each image once over all ranks),
results are gathered on rank 0 and scored with pycocotools."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from engine import collectives
from engine.coco_eval import coco_evaluate_full, detections_to_coco, merge_results
from engine.per_class import ClassResult
from pipeline import storage
from pipeline.loader import Dataset, DetectionLoader, LoaderConfig


@dataclass
class Evaluation:
    metrics: dict[str, float] | None  # rank 0 only: COCO's 12 less 3, then AP/<class> and AP50/<class>
    num_images: int
    samples: list[tuple[torch.Tensor, dict, dict]]  # (image [3, h, w], detections, ground truth) of a first batch
    classes: list[ClassResult] | None = None  # rank 0 only: per class figures and operating points
    results: list[dict] | None = None  # rank 0 only: the detections as COCO results records


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    postprocess: torch.nn.Module,
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    loader_cfg: LoaderConfig,
    device: torch.device,
    max_images: int | None = None,
    amp: bool = False,
    num_samples: int = 4,
) -> Evaluation:
    """Runs ``net`` (unwrapped, not DDP: ranks may see different numbers of batches) over the dataset."""
    loader = DetectionLoader(
        dataset, rank=rank, world_size=world_size, train=False, cfg=loader_cfg,
        device_id=device.index if device.type == "cuda" else None,
    )  # fmt: skip
    limit = None if max_images is None else max(1, -(-max_images // world_size))
    was_training = net.training
    net.eval()
    results: list[dict] = []
    image_ids: list[int] = []
    samples: list[tuple[torch.Tensor, dict, dict]] = []
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            outputs = net(batch.images)
        dets = postprocess(outputs, batch.image_sizes)
        for i, det in enumerate(dets):
            if len(samples) < num_samples:
                h, w = batch.image_sizes[i].tolist()
                gt = {
                    "boxes": batch.boxes[i, : batch.num_boxes[i]].cpu(),
                    "labels": batch.labels[i, : batch.num_boxes[i]].cpu(),
                }
                samples.append((batch.images[i, :, :h, :w].cpu(), {k: v.cpu() for k, v in det.items()}, gt))
        original = [{**d, "boxes": batch.scale_to_original(d["boxes"], i).cpu()} for i, d in enumerate(dets)]
        ids = batch.image_ids.tolist()
        results += detections_to_coco(
            ids, [{k: v.cpu() for k, v in d.items()} for d in original], dataset.category_ids()
        )
        image_ids += ids
        if limit is not None and len(image_ids) >= limit:
            break
    net.train(was_training)
    parts = collectives.gather_objects((results, image_ids))
    all_ids = sorted({i for _, ids in parts for i in ids})
    if rank != 0:
        return Evaluation(metrics=None, num_images=len(all_ids), samples=samples)
    truth = json.loads(storage.read_bytes(dataset.ground_truth_uri))
    merged = merge_results([r for r, _ in parts])
    scored = coco_evaluate_full(truth, merged, all_ids)
    return Evaluation(scored.metrics, len(all_ids), samples, scored.classes, merged)
