"""Distributed COCO evaluation: each rank predicts on its own shards (each image once over all ranks),
results are gathered on rank 0 and scored with pycocotools."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine import collectives
from engine.coco_eval import coco_evaluate_full, detections_to_coco, merge_results
from engine.per_class import ClassResult
from pipeline import storage
from pipeline.batch import Batch
from pipeline.loader import Dataset, DetectionLoader, LoaderConfig


@dataclass
class Evaluation:
    metrics: dict[str, float] | None  # rank 0 only: METRIC_NAMES, then the per-class keys (engine.per_class)
    num_images: int
    samples: list[tuple[torch.Tensor, dict, dict]]  # (image [3, h, w], detections, ground truth) of a first batch
    classes: list[ClassResult] | None = None  # rank 0 only: per class figures and operating points
    results: list[dict] | None = None  # rank 0 only: the detections as COCO results records


def detections(
    net: torch.nn.Module, postprocess: torch.nn.Module, loader, device: torch.device, amp: bool = False
) -> Iterator[tuple[Batch, list[dict[str, torch.Tensor]]]]:
    """Per batch of ``loader``: the batch on ``device`` and its detections (resized pixels, on ``device``)."""
    for batch in loader:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            outputs = net(batch.images)
        yield batch, postprocess(outputs, batch.image_sizes)


def original_detections(batch: Batch, dets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """``dets`` of each image of ``batch`` with boxes in the pixels of its source image, on the CPU."""
    return [{k: v.cpu() for k, v in {**d, "boxes": batch.scale_to_original(d["boxes"], i)}.items()}
            for i, d in enumerate(dets)]  # fmt: skip


def collect(
    net: torch.nn.Module,
    postprocess: torch.nn.Module,
    loader: DetectionLoader,
    device: torch.device,
    *,
    amp: bool = False,
    limit: int | None = None,
    num_samples: int = 0,
) -> tuple[list[dict], list[int], list[tuple[torch.Tensor, dict, dict]]]:
    """The COCO results records and image ids of ``loader``'s images (stopping once ``limit`` images are
    done), and the first ``num_samples`` as (resized image, detections, ground truth) for pictures."""
    results: list[dict] = []
    image_ids: list[int] = []
    samples: list[tuple[torch.Tensor, dict, dict]] = []
    for batch, dets in detections(net, postprocess, loader, device, amp):
        for i, det in enumerate(dets[: max(0, num_samples - len(samples))]):
            h, w = batch.image_sizes[i].tolist()
            gt = {
                "boxes": batch.boxes[i, : batch.num_boxes[i]].cpu(),
                "labels": batch.labels[i, : batch.num_boxes[i]].cpu(),
            }
            samples.append((batch.images[i, :, :h, :w].cpu(), {k: v.cpu() for k, v in det.items()}, gt))
        ids = batch.image_ids.tolist()
        results += detections_to_coco(ids, original_detections(batch, dets), loader.dataset.category_ids())
        image_ids += ids
        if limit is not None and len(image_ids) >= limit:
            break
    return results, image_ids, samples


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
    results, image_ids, samples = collect(net, postprocess, loader, device, amp=amp, limit=limit,
                                          num_samples=num_samples)  # fmt: skip
    net.train(was_training)
    parts = collectives.gather_objects((results, image_ids))
    all_ids = sorted({i for _, ids in parts for i in ids})
    if rank != 0:
        return Evaluation(metrics=None, num_images=len(all_ids), samples=samples)
    truth = json.loads(storage.read_bytes(dataset.ground_truth_uri))
    merged = merge_results([r for r, _ in parts])
    scored = coco_evaluate_full(truth, merged, all_ids)
    return Evaluation(scored.metrics, len(all_ids), samples, scored.classes, merged)
