"""Typed configuration of the RetinaNet model, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
)
NORMS = ("frozen_bn", "bn", "sync_bn")
BOX_LOSSES = ("smooth_l1", "l1", "giou")
LOSS_NORMALIZATIONS = ("batch", "per_image")
P6_INPUTS = ("c5", "p5")


@dataclass(kw_only=True)
class RetinaNetConfig:
    """Everything that defines a RetinaNet; defaults are the paper's (arXiv 1708.02002).

    Anchor sizes are ``anchor_sizes[l] * s`` for each scale ``s`` and each ``ratio = h / w``;
    the anchor area stays ``(anchor_sizes[l] * s) ** 2`` across ratios.
    ``anchor_round`` reproduces torchvision, which truncates sizes to ints and rounds corners.
    """

    num_classes: int = 80
    # Backbone
    backbone: str = "resnet50"
    backbone_norm: str = "frozen_bn"
    trainable_stages: int = 3  # of the 5 (stem, layer1..layer4), counted from the top
    backbone_weights: str | None = None  # local file of ImageNet weights (torchvision layout)
    # Start from a trained detector (read by the engine when a run has no checkpoint of its own): a torchvision
    # RetinaNet state dict file, or one of our checkpoints (folder or s3:// URI, best/ included)
    init_from: str | None = None
    init_class_map: str = "none"  # "by_name": keep the class rows whose names match the source's
    # FPN
    fpn_channels: int = 256
    p6_input: str = "c5"  # the paper; torchvision's v1 weights use "p5"
    # Head
    head_num_convs: int = 4
    head_group_norm: bool = False  # torchvision's v2 head
    prior_prob: float = 0.01
    head_init_std: float = 0.01
    # Anchors
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    anchor_scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_round: bool = False
    # Matching and box coding
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    allow_low_quality_matches: bool = True
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    box_clamp: float = math.log(1000.0 / 16)
    # Loss
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 0.1
    loss_normalization: str = "batch"  # torchvision divides per image, then averages
    # Postprocess
    score_thresh: float = 0.05
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    detections_per_image: int = 100

    def __post_init__(self) -> None:
        _one_of("backbone", self.backbone, BACKBONES)
        _one_of("backbone_norm", self.backbone_norm, NORMS)
        _one_of("p6_input", self.p6_input, P6_INPUTS)
        _one_of("box_loss", self.box_loss, BOX_LOSSES)
        _one_of("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        _one_of("init_class_map", self.init_class_map, ("none", "by_name"))
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0 <= self.trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be in 0..5, got {self.trainable_stages}")
        if len(self.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P3..P7 (5), got {self.anchor_sizes}")
        if not self.anchor_scales or not self.anchor_ratios:
            raise ValueError("anchor_scales and anchor_ratios must not be empty")
        if min(self.anchor_sizes + self.anchor_scales + self.anchor_ratios) <= 0:
            raise ValueError("anchor sizes, scales and ratios must be positive")
        if not 0 <= self.bg_iou_thresh <= self.fg_iou_thresh <= 1:
            raise ValueError(
                f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {self.bg_iou_thresh}, {self.fg_iou_thresh}"
            )
        if not 0 < self.prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {self.prior_prob}")
        if not 0 <= self.focal_alpha <= 1 or self.focal_gamma < 0:
            raise ValueError(
                f"need focal_alpha in [0, 1] and focal_gamma >= 0, got {self.focal_alpha}, {self.focal_gamma}"
            )
        if self.smooth_l1_beta < 0:
            raise ValueError(f"smooth_l1_beta must be >= 0, got {self.smooth_l1_beta}")
        if self.head_num_convs < 0 or self.fpn_channels < 1:
            raise ValueError("head_num_convs must be >= 0 and fpn_channels >= 1")
        if self.head_group_norm and self.fpn_channels % 32:
            raise ValueError(f"the GroupNorm head uses 32 groups: fpn_channels ({self.fpn_channels}) must divide by 32")
        if not 0 <= self.score_thresh < 1 or not 0 < self.nms_thresh <= 1:
            raise ValueError("need score_thresh in [0, 1) and nms_thresh in (0, 1]")
        if self.topk_candidates < 1 or self.detections_per_image < 1:
            raise ValueError("topk_candidates and detections_per_image must be >= 1")

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.anchor_scales) * len(self.anchor_ratios)


def torchvision_config(version: Literal["v1", "v2"] = "v1", **overrides: object) -> RetinaNetConfig:
    """The settings under which torchvision's ``retinanet_resnet50_fpn`` (v1) or ``_v2`` weights reproduce.

    v1: P6 from P5, L1 box loss. v2: P6 from C5, GroupNorm head, GIoU box loss. Both: torchvision's
    rounded anchors and its per-image loss normalisation.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    base: dict[str, object] = dict(
        num_classes=91,
        backbone="resnet50",
        anchor_round=True,
        loss_normalization="per_image",
        p6_input="p5" if version == "v1" else "c5",
        head_group_norm=version == "v2",
        box_loss="l1" if version == "v1" else "giou",
    )
    base.update(overrides)
    return RetinaNetConfig(**base)  # type: ignore[arg-type]


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
