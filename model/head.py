"""Classification and box subnets, shared across pyramid levels (RetinaNet section 4)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _tower(channels: int, num_convs: int, group_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        block: list[nn.Module] = [nn.Conv2d(channels, channels, 3, padding=1, bias=not group_norm)]
        if group_norm:
            block.append(nn.GroupNorm(32, channels))
        block.append(nn.ReLU(inplace=True))
        layers.append(nn.Sequential(*block))
    return nn.Sequential(*layers)


class Head(nn.Module):
    """Two subnets with separate parameters: ``num_convs`` x (3x3 conv, ReLU), then a 3x3 conv to
    ``A * K`` class logits or ``A * 4`` box deltas. Weights N(0, std), biases 0, except the final class
    bias ``-log((1 - prior) / prior)`` so that every anchor starts at foreground probability ``prior``.

    Input five maps ``[N, C, H_l, W_l]``; output ``cls_logits [N, sum_l H_l W_l A, K]`` and
    ``bbox_deltas [N, sum_l H_l W_l A, 4]``, location-major then anchor (the order of the anchors).
    """

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        group_norm: bool = False,
        prior_prob: float = 0.01,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.cls_tower = _tower(channels, num_convs, group_norm)
        self.box_tower = _tower(channels, num_convs, group_norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls_per_level, box_per_level = [], []
        for x in features:
            n, _, h, w = x.shape
            cls = self.cls_logits(self.cls_tower(x))
            box = self.bbox_pred(self.box_tower(x))
            # (N, A*K, H, W) -> (N, H, W, A*K) -> (N, HWA, K): location-major, then anchor
            cls_per_level.append(cls.permute(0, 2, 3, 1).reshape(n, h * w * self.num_anchors, self.num_classes))
            # (N, A*4, H, W) -> (N, HWA, 4)
            box_per_level.append(box.permute(0, 2, 3, 1).reshape(n, h * w * self.num_anchors, 4))
        return torch.cat(cls_per_level, dim=1), torch.cat(box_per_level, dim=1)
