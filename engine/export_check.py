"""The export's checks on a converted data set: onnxruntime against PyTorch on the same padded inputs.

1. Raw outputs: the max absolute difference of ``cls_logits`` and ``bbox_deltas`` (target < 1e-4, fp32).
2. Detections: both raw outputs through ``engine.export.OnnxPostprocess`` and pycocotools; the AP of each
   and their difference (target <= 0.001).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from engine.coco_eval import coco_evaluate, detections_to_coco
from engine.evaluate import original_detections
from engine.export import AP_TARGET, OUTPUT_NAMES, RAW_TARGET, SIZE_DIVISOR, ExportSpec, OnnxPostprocess, RawHead
from engine.inference import Predictor
from pipeline import storage
from pipeline.loader import Dataset, DetectionLoader


def session(path: Path):
    """An onnxruntime CPU session of ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fit_canvas(images: torch.Tensor, sizes: torch.Tensor, spec: ExportSpec) -> torch.Tensor:
    """A loader batch ``images [N, 3, h, w]`` (padded to its own largest image) in a zero ``[N, 3, H, W]``."""
    big_h, big_w = spec.image_size
    too_big = [(int(h), int(w)) for h, w in sizes.tolist() if h > big_h or w > big_w]
    if too_big:
        h, w = too_big[0]
        fit = max(big_h, -(-h // SIZE_DIVISOR) * SIZE_DIVISOR), max(big_w, -(-w // SIZE_DIVISOR) * SIZE_DIVISOR)
        raise ValueError(f"an image resized for evaluation is {h} x {w}, larger than the exported {big_h} x {big_w}: "
                         f"export with --image-size {fit[0]} {fit[1]}")  # fmt: skip
    canvas = torch.zeros(images.shape[0], 3, big_h, big_w)
    h, w = min(images.shape[2], big_h), min(images.shape[3], big_w)
    canvas[:, :, :h, :w] = images[:, :, :h, :w]
    return canvas


def run_onnx(sess, canvas: torch.Tensor, dynamic_batch: bool) -> list[torch.Tensor]:
    """The graph's two outputs for ``canvas``, one image at a time unless the batch is dynamic."""
    parts = [canvas] if dynamic_batch else list(canvas.split(1))
    outs = [sess.run(list(OUTPUT_NAMES), {"images": p.numpy()}) for p in parts]
    return [torch.cat([torch.from_numpy(o[i]) for o in outs]) for i in range(len(OUTPUT_NAMES))]


@torch.no_grad()
def check(predictor: Predictor, onnx_path: Path, spec: ExportSpec, dataset: Dataset, max_images: int | None) -> dict:
    """Both checks on up to ``max_images`` images of ``dataset``; the figures for ``export.json``."""
    cfg = predictor.cfg
    sess, head = session(onnx_path), RawHead(predictor.net.to("cpu").float().eval())
    postprocess = OnnxPostprocess(cfg, spec.image_size)
    loader_cfg = replace(cfg.data.loader, batch_size=cfg.data.eval_batch_size if spec.dynamic_batch else 1)
    results: dict[str, list[dict]] = {"pytorch": [], "onnx": []}
    image_ids: list[int] = []
    worst = 0.0
    for batch in DetectionLoader(dataset, rank=0, world_size=1, train=False, cfg=loader_cfg):
        canvas = fit_canvas(batch.images, batch.image_sizes, spec)
        raw = {"pytorch": list(head(canvas)), "onnx": run_onnx(sess, canvas, spec.dynamic_batch)}
        worst = max([worst, *((a - b).abs().max().item() for a, b in zip(raw["pytorch"], raw["onnx"], strict=True))])
        ids = batch.image_ids.tolist()
        for name, (logits, deltas) in raw.items():
            dets = original_detections(batch, postprocess(logits, deltas, batch.image_sizes))
            results[name] += detections_to_coco(ids, dets, dataset.category_ids())
        image_ids += ids
        if max_images is not None and len(image_ids) >= max_images:
            break
    truth = json.loads(storage.read_bytes(dataset.ground_truth_uri))
    ap = {name: coco_evaluate(truth, r, image_ids)["AP"] for name, r in results.items()}
    return {
        "data": dataset.uri, "images": len(image_ids), "raw_max_abs_diff": worst, "raw_target": RAW_TARGET,
        "ap_pytorch": ap["pytorch"], "ap_onnx": ap["onnx"], "ap_diff": abs(ap["pytorch"] - ap["onnx"]),
        "ap_target": AP_TARGET, "passed": worst < RAW_TARGET and abs(ap["pytorch"] - ap["onnx"]) <= AP_TARGET,
    }  # fmt: skip
