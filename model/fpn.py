"""Feature pyramid P3-P7 on C3-C5 (Lin et al., FPN; RetinaNet section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """P3-P5: lateral 1x1 conv + nearest top-down upsampling + 3x3 conv. P6: 3x3 stride-2 conv on C5
    (paper) or on P5 (torchvision v1). P7: ReLU then 3x3 stride-2 conv on P6.

    Input C3..C5 ``[N, C_l, H_l, W_l]``; output five maps ``[N, channels, H / 2^l, W / 2^l]``, l = 3..7.
    Parameter names match torchvision's ``backbone.fpn`` once ``load_torchvision_state_dict`` maps them.
    """

    def __init__(self, in_channels: tuple[int, int, int], channels: int = 256, p6_input: str = "c5") -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.p6_input = p6_input
        self.p6 = nn.Conv2d(in_channels[-1] if p6_input == "c5" else channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                # Detectron's "c2_xavier_fill", as torchvision and detectron2 do.
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c3, c4, c5 = features
        inner = self.lateral[2](c5)
        p5 = self.output[2](inner)
        inner = self.lateral[1](c4) + F.interpolate(inner, size=c4.shape[-2:], mode="nearest")
        p4 = self.output[1](inner)
        inner = self.lateral[0](c3) + F.interpolate(inner, size=c3.shape[-2:], mode="nearest")
        p3 = self.output[0](inner)
        p6 = self.p6(c5 if self.p6_input == "c5" else p5)
        p7 = self.p7(F.relu(p6))
        return [p3, p4, p5, p6, p7]
