"""Builds the three callables of RetinaNet from a config."""

from __future__ import annotations

from torch import nn

from model.anchors import AnchorGenerator
from model.backbone import build_backbone
from model.config import RetinaNetConfig
from model.fpn import FPN
from model.head import Head
from model.loss import RetinaNetLoss
from model.postprocess import PostProcess
from model.retinanet import RetinaNet


def build_retinanet(cfg: RetinaNetConfig) -> tuple[RetinaNet, RetinaNetLoss, PostProcess]:
    """Returns ``(net, loss_fn, postprocess)``: ``net(images) -> Outputs``,
    ``loss_fn(outputs, targets) -> dict``, ``postprocess(outputs, image_sizes) -> list[dict]``."""
    if not isinstance(cfg, RetinaNetConfig):
        raise ValueError(f"build_retinanet needs a RetinaNetConfig, got {type(cfg).__name__}")
    backbone = build_backbone(cfg.backbone, cfg.backbone_norm, cfg.trainable_stages, cfg.backbone_weights)
    fpn = FPN(backbone.out_channels, cfg.fpn_channels, cfg.p6_input)
    anchors = AnchorGenerator(cfg.anchor_sizes, cfg.anchor_scales, cfg.anchor_ratios, cfg.anchor_round)
    head = Head(
        cfg.fpn_channels,
        anchors.num_anchors_per_location,
        cfg.num_classes,
        cfg.head_num_convs,
        cfg.head_group_norm,
        cfg.prior_prob,
        cfg.head_init_std,
    )
    net = RetinaNet(backbone, fpn, head, anchors)
    if cfg.backbone_norm == "sync_bn":
        # Only swaps module types; the statistics sync once a process group exists (DDP training).
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net, RetinaNetLoss.from_config(cfg), PostProcess(cfg)
