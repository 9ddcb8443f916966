"""Prediction over a converted data set's shards with Ray: ``workers`` actors each load the checkpoint once
and take shards from a shared queue (``ray.util.ActorPool``); each shard's detections are written as COCO
results json to ``OUT/<shard>.json`` (written whole, so a file there is a finished shard). A rerun skips the
shards already written: an interrupted job resumes by shard. On GPU nodes each actor takes one GPU."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.evaluate import collect
from pipeline import storage
from pipeline.loader import Dataset, DetectionLoader


def output_name(shard_uri: str) -> str:
    return shard_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar") + ".json"


class ShardPredictor:
    """A Ray actor: the checkpoint's model, predicting one shard at a time through the evaluation pipeline."""

    def __init__(self, checkpoint: str, device: str) -> None:
        import tempfile

        from engine.inference import load_predictor

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            self.predictor = load_predictor(checkpoint, Path(tmp), device)

    @torch.no_grad()
    def predict(self, dataset: Dataset, shard: str, out_uri: str) -> tuple[str, int]:
        """Detections of every image of ``shard`` to ``out_uri`` (COCO results json); (shard, images)."""
        p = self.predictor
        cfg = replace(p.cfg.data.loader, batch_size=p.cfg.data.eval_batch_size, num_workers=1)
        device_id = p.device.index if p.device.type == "cuda" else None
        one = Dataset(dataset.uri, dataset.manifest, [shard])
        loader = DetectionLoader(one, rank=0, world_size=1, train=False, cfg=cfg, device_id=device_id)
        results, image_ids, _ = collect(p.net, p.postprocess, loader, p.device)
        storage.write_bytes(out_uri, json.dumps(results).encode())
        return shard, len(image_ids)


@dataclass
class ShardRun:
    shards: int
    skipped: int  # already written by an earlier run
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def predict_shards(checkpoint: str, dataset: Dataset, out: str, workers: int, on_done=print) -> ShardRun:
    """Predicts every shard of ``dataset`` not yet under ``out`` with ``workers`` Ray actors."""
    import ray
    from ray.util import ActorPool

    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    todo = [s for s in dataset.shards if not storage.exists(storage.join(out, output_name(s)))]
    skipped = len(dataset.shards) - len(todo)
    if not todo:
        return ShardRun(len(dataset.shards), skipped, 0, 0.0)
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(ShardPredictor)
    pool = ActorPool([actor.remote(checkpoint, "cuda" if gpus else "cpu") for _ in range(min(workers, len(todo)))])
    start, images = time.perf_counter(), 0
    jobs = pool.map_unordered(lambda a, s: a.predict.remote(dataset, s, storage.join(out, output_name(s))), todo)
    for shard, count in jobs:
        images += count
        on_done(f"{output_name(shard)}: {count} images")
    return ShardRun(len(dataset.shards), skipped, images, time.perf_counter() - start)
