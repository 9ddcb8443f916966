"""A trained model from a checkpoint, for evaluation and prediction outside the training run."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine import checkpoint as ckpt
from engine.config import TrainConfig, from_dict
from model import build_retinanet


@dataclass
class Predictor:
    cfg: TrainConfig
    net: torch.nn.Module
    postprocess: torch.nn.Module
    categories: list[dict]
    device: torch.device
    uri: str  # the checkpoint it was loaded from
    thresholds: dict | None = None  # the checkpoint's thresholds.json (engine.per_class), if it has one

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in sorted(self.categories, key=lambda c: c["label"])]

    @torch.no_grad()
    def predict_images(self, images: list[tuple[bytes, int, int]]) -> list[dict[str, torch.Tensor]]:
        """``(JPEG bytes, height, width)`` per image -> its detections (``boxes [D, 4]`` xyxy in its own pixels,
        ``scores [D]``, ``labels [D]``), through the evaluation's own DALI pipeline and batch size (one
        preprocessing path: what predict.py draws is what evaluate.py scores)."""
        from engine.evaluate import detections, original_detections
        from pipeline.loader import DetectionLoader
        from pipeline.reader import Sample

        samples = [Sample(str(i), data, i, h, w, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
                   for i, (data, h, w) in enumerate(images)]  # fmt: skip
        cfg = replace(self.cfg.data.loader, batch_size=self.cfg.data.eval_batch_size)
        device_id = self.device.index if self.device.type == "cuda" else None
        loader = DetectionLoader.over_samples(samples, self.cfg.model.num_classes, cfg, device_id)
        out: list[dict[str, torch.Tensor]] = [{} for _ in samples]
        for batch, dets in detections(self.net, self.postprocess, loader, self.device):
            for image_id, det in zip(batch.image_ids.tolist(), original_detections(batch, dets), strict=True):
                out[image_id] = det
        return out


def load_predictor(uri: str, workdir: Path, device: str = "cpu") -> Predictor:
    """``uri``: a complete checkpoint (local or s3://; a checkpoint folder, a run's ``best/``, or a run folder for
    its newest checkpoint). ``ValueError`` if it is not one, is incomplete, or needs unsafe unpickling."""
    uri = ckpt.resolve(uri)
    directory = ckpt.fetch(uri, workdir)
    cfg = from_dict(ckpt.read_config(directory))
    net, _, postprocess = build_retinanet(cfg.model)
    ckpt.load_weights(directory, net)
    categories = ckpt.read_categories(directory) or [
        {"id": i + 1, "name": f"class {i}", "label": i} for i in range(cfg.model.num_classes)
    ]
    dev = torch.device(device)
    saved = directory / ckpt.THRESHOLDS
    thresholds = json.loads(saved.read_text()) if saved.exists() else None
    return Predictor(cfg, net.to(dev).eval(), postprocess, categories, dev, uri, thresholds)


def class_thresholds(spec: str, class_names: list[str], saved: dict | None, where: str) -> torch.Tensor:
    """``[K]`` score thresholds by label: ``spec`` a number for every class, or ``auto`` for each class's
    best-F1 threshold of ``saved`` (a thresholds.json, from ``where``). ``ValueError`` with what to do."""
    if spec != "auto":
        try:
            return torch.full((len(class_names),), float(spec))
        except ValueError:
            raise ValueError(f"--score-thresh {spec!r}: give a number (e.g. 0.3) or auto") from None
    if not saved or "classes" not in saved:
        raise ValueError(
            f"--score-thresh auto: {where} has no thresholds.json (it holds those of an evaluation); run "
            "python jobs/evaluate.py --checkpoint ... --data VAL --out DIR and add --thresholds DIR/thresholds.json"
        )
    per_class = saved["classes"]
    missing = [n for n in class_names if n not in per_class]
    if missing:
        raise ValueError(f"--score-thresh auto: {where} has no threshold for {', '.join(missing[:5])}")
    return torch.tensor([float(per_class[n]["threshold"]) for n in class_names])
