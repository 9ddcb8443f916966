"""Detections from head outputs: per-level top-k, decode, clip, class-wise NMS, batched over images."""

from __future__ import annotations

import math

import torch
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms

from model.boxes import BoxCoder
from model.config import RetinaNetConfig
from model.retinanet import Outputs


class PostProcess(torch.nn.Module):
    """``postprocess(outputs, image_sizes)`` -> one dict per image: ``boxes [D, 4]`` float xyxy pixels
    clipped to that image's ``(H, W)``, ``scores [D]`` float descending, ``labels [D]`` int64; D <= the cap.

    Per level: the ``topk_candidates`` best (anchor, class) scores above ``score_thresh``; all levels
    merged; NMS per image and class at ``nms_thresh``; the best ``detections_per_image`` kept.
    """

    def __init__(self, cfg: RetinaNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.box_coder = BoxCoder(cfg.box_coder_weights, cfg.box_clamp)
        # sigmoid is monotone: compare logits with logit(score_thresh) and take sigmoid of the winners only
        self.logit_thresh = math.log(cfg.score_thresh / (1 - cfg.score_thresh)) if cfg.score_thresh > 0 else -math.inf

    @torch.no_grad()
    def forward(
        self, outputs: Outputs, image_sizes: list[tuple[int, int]] | torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        cls_logits, deltas, anchors = outputs["cls_logits"], outputs["bbox_deltas"], outputs["anchors"]
        n, _, k = cls_logits.shape
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=deltas.device).reshape(-1, 2)
        if sizes.shape[0] != n:
            raise ValueError(f"image_sizes must hold one (H, W) per image ({n}), got {sizes.shape[0]}")
        boxes_l, scores_l, labels_l, keep_l = [], [], [], []
        start = 0
        for num in outputs["num_anchors_per_level"]:
            logits = cls_logits[:, start : start + num].reshape(n, num * k)  # (N, A_l, K) -> (N, A_l*K)
            top, idx = logits.topk(min(self.cfg.topk_candidates, num * k), dim=1)  # [N, T]
            anchor_idx = idx // k + start
            labels_l.append(idx % k)
            keep_l.append(top > self.logit_thresh)
            scores_l.append(torch.sigmoid(top.float()))
            sel_deltas = deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # [N, T, 4]
            boxes_l.append(self.box_coder.decode(sel_deltas.float(), anchors[anchor_idx]))
            start += num
        boxes = torch.cat(boxes_l, 1)  # [N, C, 4]
        boxes = torch.minimum(boxes.clamp(min=0), sizes[:, None, [1, 0, 1, 0]])  # clip x to W, y to H
        scores, labels, keep = torch.cat(scores_l, 1), torch.cat(labels_l, 1), torch.cat(keep_l, 1)
        image_idx = torch.arange(n, device=boxes.device)[:, None].expand_as(labels)
        boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]
        kept = batched_nms(boxes, scores, image_idx * k + labels, self.cfg.nms_thresh)  # descending score
        return _split_per_image(kept, image_idx, boxes, scores, labels, n, self.cfg.detections_per_image)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thresh: float) -> torch.Tensor:
    """NMS within each group; returns kept indices by descending score.

    On a GPU, one kernel: groups are shifted apart so they never overlap, in float64, where float32
    would round coordinates at large offsets. On a CPU, whose NMS is quadratic in the boxes of a call,
    one call per group (torchvision's ``batched_nms``): far fewer pairs.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if not boxes.is_cuda:
        return tv_batched_nms(boxes, scores, groups, thresh)
    boxes64 = boxes.double()
    offsets = groups.double() * (boxes64.max() + 1)
    return nms(boxes64 + offsets[:, None], scores.double(), thresh)


def _split_per_image(
    kept: torch.Tensor,
    image_idx: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    num_images: int,
    cap: int,
) -> list[dict[str, torch.Tensor]]:
    img = image_idx[kept]
    order = torch.sort(img, stable=True).indices  # group by image, scores stay descending inside
    kept, img = kept[order], img[order]
    counts = torch.bincount(img, minlength=num_images)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(kept.numel(), device=kept.device) - starts[img]
    kept = kept[rank < cap]
    sections = counts.clamp(max=cap).tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            boxes[kept].split(sections), scores[kept].split(sections), labels[kept].split(sections), strict=True
        )
    ]
