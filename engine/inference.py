"""A trained model from a checkpoint, for evaluation and prediction outside the training run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import checkpoint as ckpt
from engine.config import TrainConfig, from_dict
from model import build_retinanet
from pipeline.dali import MEAN, SIZE_DIVISOR, STD


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
    def predict(self, rgb: np.ndarray) -> dict[str, torch.Tensor]:
        """``rgb [H, W, 3]`` uint8 -> detections in its pixels, resized as in evaluation."""
        from PIL import Image

        aug = self.cfg.data.loader.aug
        h, w = rgb.shape[:2]
        scale = min(aug.eval_size / min(h, w), aug.max_size / max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        resized = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
        image = (torch.from_numpy(resized) - torch.tensor(MEAN)) / torch.tensor(STD)
        ph, pw = -(-nh // SIZE_DIVISOR) * SIZE_DIVISOR, -(-nw // SIZE_DIVISOR) * SIZE_DIVISOR
        batch = torch.zeros(1, 3, ph, pw)
        batch[0, :, :nh, :nw] = image.permute(2, 0, 1)
        det = self.postprocess(self.net(batch.to(self.device)), [(nh, nw)])[0]
        det = {k: v.cpu() for k, v in det.items()}
        det["boxes"] = det["boxes"] * torch.tensor([w / nw, h / nh, w / nw, h / nh])
        return det


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
