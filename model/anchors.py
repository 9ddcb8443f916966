"""Anchor boxes for the FPN levels, cached per feature-map size."""

from __future__ import annotations

import math

import torch
from torch import nn


def cell_anchors(size: float, scales: tuple[float, ...], ratios: tuple[float, ...], round_: bool) -> torch.Tensor:
    """The ``A = len(ratios) * len(scales)`` anchors of one location, centred on 0, ratio-major order.

    Returns ``[A, 4]`` float32 xyxy. For ``ratio = h / w`` the area stays ``(size * scale) ** 2``.
    ``round_`` reproduces torchvision: sizes truncated to ints, corners rounded.
    """
    sizes = torch.tensor([float(int(size * s)) if round_ else size * s for s in scales], dtype=torch.float32)
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    return base.round() if round_ else base


class AnchorGenerator(nn.Module):
    """Anchors for every level, for a padded image size; results are cached by (sizes, device, dtype).

    Anchors of level l sit at ``(x * stride + offset * stride, y * stride + offset * stride)`` for each cell,
    location-major then anchor: ``[H_l * W_l * A, 4]`` xyxy, concatenated over levels to ``[sum_l H_l W_l A, 4]``.
    """

    def __init__(
        self,
        sizes: tuple[float, ...],
        scales: tuple[float, ...],
        ratios: tuple[float, ...],
        round_: bool = False,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.cells = [cell_anchors(s, scales, ratios, round_) for s in sizes]
        self.offset = offset
        self.num_anchors_per_location = len(scales) * len(ratios)
        self._cache: dict[tuple, tuple[torch.Tensor, list[int]]] = {}

    def forward(
        self,
        image_size: tuple[int, int],
        feature_sizes: list[tuple[int, int]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, list[int]]:
        """Returns ``(anchors [sum_l H_l W_l A, 4], num_anchors_per_level)``."""
        key = (tuple(image_size), tuple(feature_sizes), str(device), dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        per_level = []
        for cell, (h, w) in zip(self.cells, feature_sizes, strict=True):
            stride_h, stride_w = image_size[0] // h, image_size[1] // w
            shift_x = (torch.arange(w, dtype=torch.float32) + self.offset) * stride_w
            shift_y = (torch.arange(h, dtype=torch.float32) + self.offset) * stride_h
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            # (HW, 1, 4) + (1, A, 4) -> (HWA, 4), location-major
            per_level.append((shifts + cell.reshape(1, -1, 4)).reshape(-1, 4))
        anchors = torch.cat(per_level).to(device=device, dtype=dtype)
        result = (anchors, [len(a) for a in per_level])
        if len(self._cache) > 64:  # many input sizes (multi-scale training): bound the memory
            self._cache.clear()
        self._cache[key] = result
        return result


def level_sizes(image_size: tuple[int, int], num_levels: int = 5, first_level: int = 3) -> list[tuple[int, int]]:
    """Feature sizes of P3..P7 for a padded image size (ceil division, as the convs produce)."""
    return [
        (math.ceil(image_size[0] / 2**level), math.ceil(image_size[1] / 2**level))
        for level in range(first_level, first_level + num_levels)
    ]
