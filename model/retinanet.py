"""The RetinaNet network: backbone -> FPN -> head, plus the anchors its outputs refer to."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn

from model.anchors import AnchorGenerator
from model.backbone import ResNetTrunk

SIZE_DIVISOR = 128  # stride of P7


class Outputs(TypedDict):
    """What ``RetinaNet.forward`` returns; ``A = sum_l H_l W_l * anchors_per_location``.

    - ``cls_logits``: ``[N, A, K]`` float, pre-sigmoid class scores.
    - ``bbox_deltas``: ``[N, A, 4]`` float, (dx, dy, dw, dh) relative to ``anchors``.
    - ``anchors``: ``[A, 4]`` float32 xyxy pixels of the padded input, shared by every image.
    - ``num_anchors_per_level``: five ints summing to ``A`` (P3 first).
    - ``image_size``: ``(H, W)`` of the padded input.
    """

    cls_logits: torch.Tensor
    bbox_deltas: torch.Tensor
    anchors: torch.Tensor
    num_anchors_per_level: list[int]
    image_size: tuple[int, int]


class RetinaNet(nn.Module):
    """Sub-modules are injected; ``build_retinanet`` reads a config and makes them."""

    def __init__(
        self, backbone: ResNetTrunk, fpn: nn.Module, head: nn.Module, anchor_generator: AnchorGenerator
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.anchor_generator = anchor_generator

    def forward(self, images: torch.Tensor) -> Outputs:
        """``images [N, 3, H, W]`` float, normalised, H and W multiples of 128 (pad with zeros)."""
        check_images(images)
        features = self.fpn(self.backbone(images))
        cls_logits, bbox_deltas = self.head(features)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        anchors, num_per_level = self.anchor_generator(
            image_size,
            [(f.shape[-2], f.shape[-1]) for f in features],
            images.device,
            torch.float32,
        )
        return Outputs(
            cls_logits=cls_logits,
            bbox_deltas=bbox_deltas,
            anchors=anchors,
            num_anchors_per_level=num_per_level,
            image_size=image_size,
        )


def check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have rank 4 [N, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} in shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float (normalised), got {images.dtype}")
    h, w = images.shape[-2:]
    if h % SIZE_DIVISOR or w % SIZE_DIVISOR or h == 0 or w == 0:
        raise ValueError(
            f"image height and width must be positive multiples of {SIZE_DIVISOR} (pad the batch), got {h}x{w}"
        )
