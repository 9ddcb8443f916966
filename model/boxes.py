"""Box coding and anchor-to-ground-truth matching, batched over images."""

from __future__ import annotations

import torch

# Matcher labels, as in torchvision and Detectron.
BACKGROUND = -1
IGNORE = -2
# IoU elements per chunk on the CPU: a chunk's temporaries stay in cache.
_CPU_CHUNK_ELEMENTS = 1 << 17


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
    bx1, by1, bx2, by2 = (c[..., None] for c in boxes.unbind(-1))  # [N, M, 1] each
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)  # [A] each
    inter = (torch.minimum(bx2, ax2) - torch.maximum(bx1, ax1)).clamp_(min=0)
    inter.mul_((torch.minimum(by2, ay2) - torch.maximum(by1, ay1)).clamp_(min=0))
    union = ((bx2 - bx1) * (by2 - by1)) + ((ax2 - ax1) * (ay2 - ay1)) - inter
    return inter.div_(union)


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
    best_iou, best_box = iou.max(dim=1)  # [N, A]
    matches = _thresholds(best_iou, best_box, fg_thresh, bg_thresh)
    if allow_low_quality:
        best_per_box = iou.max(dim=2).values  # [N, M]
        matches = torch.where(_is_best_for_a_box(iou, best_per_box), best_box, matches)
    return matches


def match_anchors(
    boxes: torch.Tensor,
    valid: torch.Tensor,
    anchors: torch.Tensor,
    fg_thresh: float,
    bg_thresh: float,
    allow_low_quality: bool,
) -> torch.Tensor:
    """``match(batched_box_iou(boxes, anchors), valid, ...)`` computed in anchor chunks that stay in
    cache on the CPU (one chunk on GPUs): ``boxes [N, M, 4]``, ``valid [N, M]``, ``anchors [A, 4]`` -> ``[N, A]``.
    """
    n, m = valid.shape
    num_anchors = anchors.shape[0]
    step = num_anchors if anchors.is_cuda else max(1024, _CPU_CHUNK_ELEMENTS // max(1, n * m))
    best_iou = torch.empty(n, num_anchors, device=anchors.device)
    best_box = torch.empty(n, num_anchors, dtype=torch.int64, device=anchors.device)
    best_per_box = torch.full((n, m), -1.0, device=anchors.device)
    chunks = []
    for start in range(0, num_anchors, step):
        part = slice(start, start + step)
        iou = batched_box_iou(boxes, anchors[part]).masked_fill_(~valid[..., None], -1.0)  # [N, M, a]
        torch.max(iou, dim=1, out=(best_iou[:, part], best_box[:, part]))
        best_per_box = torch.maximum(best_per_box, iou.max(dim=2).values)
        chunks.append((part, iou))
    matches = _thresholds(best_iou, best_box, fg_thresh, bg_thresh)
    if allow_low_quality:
        for part, iou in chunks:
            low = _is_best_for_a_box(iou, best_per_box)
            matches[:, part] = torch.where(low, best_box[:, part], matches[:, part])
    return matches


def _thresholds(best_iou: torch.Tensor, best_box: torch.Tensor, fg_thresh: float, bg_thresh: float) -> torch.Tensor:
    # torch.where, not a boolean-mask assignment: no nonzero(), so no host sync on GPUs
    matches = torch.where(best_iou < fg_thresh, IGNORE, best_box)
    return torch.where(best_iou < bg_thresh, BACKGROUND, matches)


def _is_best_for_a_box(iou: torch.Tensor, best_per_box: torch.Tensor) -> torch.Tensor:
    """``iou [N, M, a]`` (padding rows at -1), ``best_per_box [N, M]`` -> ``[N, a]``: the anchor is the
    best (or tied best) of some box that overlaps anything at all."""
    best = best_per_box[..., None]
    return ((iou == best) & (best > 0)).any(dim=1)
