"""torchvision's RetinaNet built at settings comparable with ours (test helper, not a test)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead, _default_anchorgen
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d


def torchvision_retinanet(version: str = "v1", num_classes: int = 91) -> RetinaNet:
    """``retinanet_resnet50_fpn`` (v1) or ``_v2`` with random init, frozen BN, no download, no resize."""
    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    extra = LastLevelP6P7(256, 256) if version == "v1" else LastLevelP6P7(2048, 256)
    backbone = _resnet_fpn_extractor(trunk, 3, returned_layers=[2, 3, 4], extra_blocks=extra)
    anchors = _default_anchorgen()
    head = None
    if version == "v2":
        head = RetinaNetHead(
            backbone.out_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(nn.GroupNorm, 32),
        )
        head.regression_head._loss_type = "giou"
    return RetinaNet(
        backbone, num_classes, anchor_generator=anchors, head=head, min_size=256, max_size=4096, detections_per_img=100
    )


def split_levels(x: torch.Tensor, num_per_level: list[int]) -> list[torch.Tensor]:
    return list(x.split(num_per_level, dim=1))
