"""Box coding and anchor-to-ground-truth matching, batched over images."""

from __future__ import annotations

import torch

# Matcher labels, as in torchvision and Detectron.
BACKGROUND = -1
IGNORE = -2


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas from anchors and back.

    All boxes xyxy absolute pixels. ``dw, dh`` are clamped to ``clamp`` before ``exp`` when decoding.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), clamp: float = 4.135) -> None:
        self.weights = weights
        self.clamp = clamp

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """``boxes``, ``anchors`` ``[..., 4]`` (broadcastable) -> deltas ``[..., 4]``."""
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        bw = boxes[..., 2] - boxes[..., 0]
        bh = boxes[..., 3] - boxes[..., 1]
        bx = boxes[..., 0] + 0.5 * bw
        by = boxes[..., 1] + 0.5 * bh
        return torch.stack(
            [wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * torch.log(bw / aw), wh * torch.log(bh / ah)], dim=-1
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """``deltas``, ``anchors`` ``[..., 4]`` (broadcastable) -> boxes ``[..., 4]`` xyxy."""
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        cx = deltas[..., 0] / wx * aw + ax
        cy = deltas[..., 1] / wy * ah + ay
        half_w = 0.5 * torch.exp(torch.clamp(deltas[..., 2] / ww, max=self.clamp)) * aw
        half_h = 0.5 * torch.exp(torch.clamp(deltas[..., 3] / wh, max=self.clamp)) * ah
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def batched_box_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes [N, M, 4]`` with ``anchors [A, 4]`` -> ``[N, M, A]``."""
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # [N, M]
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])  # [A]
    lt = torch.maximum(boxes[..., None, :2], anchors[:, :2])  # [N, M, A, 2]
    rb = torch.minimum(boxes[..., None, 2:], anchors[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_b[..., None] + area_a - inter)


def match(
    iou: torch.Tensor, valid: torch.Tensor, fg_thresh: float, bg_thresh: float, allow_low_quality: bool
) -> torch.Tensor:
    """Assigns each anchor a box index, ``BACKGROUND`` (-1) or ``IGNORE`` (-2).

    ``iou [N, M, A]``; ``valid [N, M]`` bool marks real (not padding) boxes. Returns ``[N, A]`` int64.
    IoU >= fg_thresh: the best box; < bg_thresh: background; between: ignored. With ``allow_low_quality``,
    an anchor that is some box's best match (ties included) keeps its best box even below fg_thresh
    (torchvision / Detectron rule), provided that IoU is above 0.
    """
    iou = iou.masked_fill(~valid[..., None], -1.0)
    if iou.shape[1] == 0:
        return torch.full((iou.shape[0], iou.shape[2]), BACKGROUND, dtype=torch.int64, device=iou.device)
    best_iou, best_box = iou.max(dim=1)  # [N, A]
    matches = best_box.clone()
    matches[best_iou < fg_thresh] = IGNORE
    matches[best_iou < bg_thresh] = BACKGROUND
    if allow_low_quality:
        best_per_box = iou.max(dim=2, keepdim=True).values  # [N, M, 1]
        is_best = (iou == best_per_box) & valid[..., None] & (best_per_box > 0)
        low_quality = is_best.any(dim=1)  # [N, A]
        matches = torch.where(low_quality, best_box, matches)
    return matches
