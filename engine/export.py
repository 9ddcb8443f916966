"""ONNX export of a trained RetinaNet, and the two checks that it lost nothing.

The split, documented in ``export.json``: the graph is the network, ``images [N, 3, H, W]`` (float32, RGB,
normalised as in training, zero-padded at the bottom and right to the exported ``H x W``) to the raw head
outputs ``cls_logits [N, A, K]`` and ``bbox_deltas [N, A, 4]``; decode, per-class NMS and the top
detections are ``onnx_detections`` below, the same ``model.postprocess.PostProcess`` that evaluation uses,
on anchors from the model's own generator for ``H x W``. (ONNX's NonMaxSuppression inside the graph would
be a second implementation of the postprocess to keep equal to this one.)

Checks (``check``): 1. raw outputs of onnxruntime against PyTorch's on real validation images (max abs
difference; target < 1e-4 in fp32); 2. COCO AP of the detections of both on the same padded inputs
(difference; target <= 0.001).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import TrainConfig, to_dict
from engine.inference import Predictor
from model.anchors import level_sizes
from model.retinanet import Outputs

MIN_OPSET = 18  # torch.onnx's exporter (torch.export based) writes opset 18 and newer
SIZE_DIVISOR = 128
RAW_TARGET, AP_TARGET = 1e-4, 1e-3
OUTPUT_NAMES = ("cls_logits", "bbox_deltas")


class RawHead(torch.nn.Module):
    """The exported graph: ``images [N, 3, H, W]`` -> ``(cls_logits [N, A, K], bbox_deltas [N, A, 4])``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(images)
        return out["cls_logits"], out["bbox_deltas"]


@dataclass(frozen=True)
class ExportSpec:
    image_size: tuple[int, int]  # (H, W), multiples of 128
    opset: int = MIN_OPSET
    dynamic_batch: bool = False

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h <= 0 or w <= 0 or h % SIZE_DIVISOR or w % SIZE_DIVISOR:
            fit = [max(SIZE_DIVISOR, -(-v // SIZE_DIVISOR) * SIZE_DIVISOR) for v in (h, w)]
            raise ValueError(f"--image-size {h} {w}: both sides must be positive multiples of {SIZE_DIVISOR} "
                             f"(the network's stride): use --image-size {fit[0]} {fit[1]}")  # fmt: skip
        if self.opset < MIN_OPSET:
            raise ValueError(f"--opset {self.opset} is too old: the exporter writes opset {MIN_OPSET} or newer "
                             f"(NonMaxSuppression itself needs 10); use --opset {MIN_OPSET}")  # fmt: skip


def default_image_size(cfg: TrainConfig) -> tuple[int, int]:
    """A square that holds every evaluation resize: the longest side, rounded up to a multiple of 128."""
    aug = cfg.data.loader.aug
    side = max(SIZE_DIVISOR, -(-aug.max_size // SIZE_DIVISOR) * SIZE_DIVISOR)
    return side, side


def export_onnx(predictor: Predictor, path: Path, spec: ExportSpec) -> None:
    """Writes the graph (``RawHead`` of the predictor's network on the CPU in fp32) to ``path``."""
    net = predictor.net.to("cpu").float().eval()
    example = torch.zeros(2 if spec.dynamic_batch else 1, 3, *spec.image_size)
    shapes = {"images": {0: torch.export.Dim("batch", min=1, max=256)}} if spec.dynamic_batch else None
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's progress lines
        warnings.simplefilter("ignore")
        torch.onnx.export(
            RawHead(net), (example,), str(path), dynamo=True, opset_version=spec.opset, input_names=["images"],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=shapes, verbose=False,
        )  # fmt: skip


class OnnxPostprocess:
    """The postprocess half of the split for one padded input size: the evaluation's ``PostProcess`` and the
    model's anchors for ``padded (H, W)``, built once and applied to every batch of raw outputs."""

    def __init__(self, cfg: TrainConfig, padded: tuple[int, int]) -> None:
        from engine.anchor_coverage import anchor_generator
        from model import PostProcess

        self.postprocess, self.padded = PostProcess(cfg.model), padded
        device = torch.device("cpu")
        self.anchors, per_level = anchor_generator(cfg.model)(padded, level_sizes(padded), device, torch.float32)
        self.per_level = list(per_level)

    def __call__(self, cls_logits, bbox_deltas, image_sizes) -> list[dict[str, torch.Tensor]]:
        """Raw outputs (numpy or torch) of images resized to ``image_sizes`` ``(h, w)`` -> per image
        ``boxes [D, 4]`` (xyxy in resized pixels), ``scores``, ``labels``, exactly as evaluation computes them."""
        outputs = Outputs(
            cls_logits=torch.as_tensor(cls_logits), bbox_deltas=torch.as_tensor(bbox_deltas), anchors=self.anchors,
            num_anchors_per_level=self.per_level, image_size=self.padded,
        )  # fmt: skip
        return self.postprocess(outputs, image_sizes)


def onnx_detections(
    cls_logits, bbox_deltas, image_sizes: list[tuple[int, int]], cfg: TrainConfig, padded: tuple[int, int]
) -> list[dict[str, torch.Tensor]]:
    """``OnnxPostprocess(cfg, padded)`` applied once (for many batches, build one and call it)."""
    return OnnxPostprocess(cfg, padded)(cls_logits, bbox_deltas, image_sizes)


def input_contract(cfg: TrainConfig, spec: ExportSpec) -> dict:
    from pipeline.dali import MEAN, STD

    aug = cfg.data.loader.aug
    return {
        "name": "images", "shape": ["batch" if spec.dynamic_batch else 1, 3, *spec.image_size], "dtype": "float32",
        "layout": "NCHW, RGB",
        "resize": f"shorter side to {aug.eval_size}, longer side at most {aug.max_size}, aspect kept (DALI "
                  "fn.resize defaults: linear, antialiased when shrinking)",
        "normalise": {"mean": list(MEAN), "std": list(STD), "rule": "(pixel 0..255 - mean) / std per channel"},
        "padding": f"zeros (after normalising) at the bottom and right, to {spec.image_size[0]} x {spec.image_size[1]}",
        "outputs": {"cls_logits": "[N, A, K] logits (sigmoid: scores)", "bbox_deltas": "[N, A, 4] box deltas"},
        "postprocess": "engine.export.onnx_detections (model.postprocess.PostProcess on the model's anchors)",
    }  # fmt: skip


def write_manifest(path: Path, predictor: Predictor, spec: ExportSpec, checks: dict | None) -> dict:
    """``export.json``: config, categories, thresholds, the input contract and the checks' figures."""
    manifest = {
        "format": "onnx", "opset": spec.opset, "checkpoint": predictor.uri, "config": to_dict(predictor.cfg),
        "categories": predictor.categories, "thresholds": predictor.thresholds,
        "input": input_contract(predictor.cfg, spec), "checks": checks,
    }  # fmt: skip
    path.write_text(json.dumps(manifest, indent=1))
    return manifest
