"""Focal loss for classification and a box loss, matched and computed for the whole batch at once."""

from __future__ import annotations

import torch
from torchvision.ops import generalized_box_iou_loss

from model.boxes import IGNORE, BoxCoder, match_anchors
from model.config import RetinaNetConfig
from model.focal import focal_loss_terms, negative_focal_sum
from model.retinanet import Outputs


class RetinaNetLoss(torch.nn.Module):
    """``loss_fn(outputs, targets)``: matches anchors to boxes, then focal + box loss.

    ``targets``: one dict per image, ``boxes [M_i, 4]`` float xyxy pixels of the padded input and
    ``labels [M_i]`` int64 in ``[0, K)``; ``M_i = 0`` is valid (only negatives). Or the whole batch
    already padded (``Batch.padded_targets()``, the training loop's form): ``{"boxes": [N, M, 4],
    "labels": [N, M]}`` with label -1 on padding rows; no Python loop and no host sync then.
    ``check_inputs``: ``ValueError`` for a bad box or label (one host sync per call).
    Returns ``loss_cls``, ``loss_box``, ``loss`` (their sum) as scalars and ``num_foreground`` (int64 scalar,
    over the batch). Normalisation ``batch``: sums over the batch divided by ``max(1, num_foreground)``;
    ``per_image``: each image by its own count, then the mean over images (torchvision).
    """

    def __init__(
        self,
        *,
        focal_alpha: float,
        focal_gamma: float,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        allow_low_quality_matches: bool,
        box_loss: str,
        smooth_l1_beta: float,
        loss_normalization: str,
        box_coder: BoxCoder,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches
        self.box_loss, self.smooth_l1_beta, self.loss_normalization = box_loss, smooth_l1_beta, loss_normalization
        self.box_coder = box_coder
        self.check_inputs = check_inputs

    @classmethod
    def from_config(cls, cfg: RetinaNetConfig, check_inputs: bool = True) -> RetinaNetLoss:
        """The loss with the matching, focal and box-loss settings of ``cfg`` (validated there)."""
        return cls(
            focal_alpha=cfg.focal_alpha,
            focal_gamma=cfg.focal_gamma,
            fg_iou_thresh=cfg.fg_iou_thresh,
            bg_iou_thresh=cfg.bg_iou_thresh,
            allow_low_quality_matches=cfg.allow_low_quality_matches,
            box_loss=cfg.box_loss,
            smooth_l1_beta=cfg.smooth_l1_beta,
            loss_normalization=cfg.loss_normalization,
            box_coder=BoxCoder(cfg.box_coder_weights, cfg.box_clamp),
            check_inputs=check_inputs,
        )

    def forward(
        self, outputs: Outputs, targets: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # float32 maths even under bf16 autocast: the focal sum over K classes and log/exp need the range
        cls_logits, deltas = outputs["cls_logits"].float(), outputs["bbox_deltas"].float()
        anchors = outputs["anchors"]
        n, _, k = cls_logits.shape
        if isinstance(targets, dict):
            boxes, labels, valid = padded_batch_targets(targets, n, cls_logits.device)
        else:
            boxes, labels, valid = pad_targets(targets, n, cls_logits.device)
        if self.check_inputs:
            check_targets(boxes, labels, valid, k, outputs["image_size"])
        matches = match_anchors(
            boxes, valid, anchors, self.fg_iou_thresh, self.bg_iou_thresh, self.allow_low_quality_matches
        )  # [N, A]
        fg = matches >= 0
        counted = matches != IGNORE
        idx = matches.clamp(min=0)
        matched_labels = labels.gather(1, idx)  # [N, A]
        matched_boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4))  # [N, A, 4]

        # Every counted anchor contributes its all-negative loss; foreground anchors then swap the term of
        # their class for the positive one. Avoids a one-hot [N, A, K] target.
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_sum = negative_focal_sum(cls_logits, alpha, gamma)  # [N, A]
        x_true = cls_logits.gather(2, matched_labels[..., None]).squeeze(2)  # [N, A]
        neg_true, pos_true = focal_loss_terms(x_true, alpha, gamma)
        cls_per_anchor = torch.where(fg, neg_sum - neg_true + pos_true, neg_sum)
        cls_per_image = torch.where(counted, cls_per_anchor, 0.0).sum(dim=1)  # [N]

        box_per_anchor = self._box_loss(deltas, anchors, matched_boxes)  # [N, A]
        box_per_image = torch.where(fg, box_per_anchor, 0.0).sum(dim=1)  # [N]

        num_fg_per_image = fg.sum(dim=1)
        num_fg = num_fg_per_image.sum()
        if self.loss_normalization == "batch":
            norm = num_fg.clamp(min=1).to(cls_per_image.dtype)
            loss_cls, loss_box = cls_per_image.sum() / norm, box_per_image.sum() / norm
        else:
            norm = num_fg_per_image.clamp(min=1).to(cls_per_image.dtype)
            loss_cls, loss_box = (cls_per_image / norm).mean(), (box_per_image / norm).mean()
        return {"loss": loss_cls + loss_box, "loss_cls": loss_cls, "loss_box": loss_box, "num_foreground": num_fg}

    def _box_loss(self, deltas: torch.Tensor, anchors: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        """``[N, A, 4]`` predictions and matched boxes -> ``[N, A]`` loss per anchor (garbage off foreground)."""
        kind = self.box_loss
        if kind == "giou":
            return generalized_box_iou_loss(self.box_coder.decode(deltas, anchors), matched, reduction="none")
        target = self.box_coder.encode(matched, anchors)
        diff = (deltas - target).abs()
        beta = self.smooth_l1_beta
        if kind == "smooth_l1" and beta > 0:
            diff = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
        return diff.sum(dim=-1)


def pad_targets(
    targets: list[dict[str, torch.Tensor]], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged targets -> ``boxes [N, M, 4]`` float32, ``labels [N, M]`` int64, ``valid [N, M]`` bool, M >= 1.

    Padding is a harmless unit box with label 0, masked out by ``valid``.
    """
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per image), got {type(targets).__name__}")
    counts = []
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' [M, 4] and 'labels' [M]")
        b, lab = t["boxes"], t["labels"]
        if b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [M, 4], got {tuple(b.shape)}")
        if lab.dim() != 1 or lab.shape[0] != b.shape[0]:
            raise ValueError(f"targets[{i}]['labels'] must have shape [{b.shape[0]}], got {tuple(lab.shape)}")
        if lab.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be integers, got {lab.dtype}")
        counts.append(b.shape[0])
    m = max(1, max(counts, default=0))
    boxes = torch.zeros(batch_size, m, 4, dtype=torch.float32, device=device)
    boxes[..., 2:] = 1.0
    labels = torch.zeros(batch_size, m, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):  # copies only; the maths below is batched
        boxes[i, : counts[i]] = t["boxes"].to(device=device, dtype=torch.float32)
        labels[i, : counts[i]] = t["labels"].to(device=device)
    valid = torch.arange(m, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
    return boxes, labels, valid


def padded_batch_targets(
    targets: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``{"boxes": [N, M, 4], "labels": [N, M]}`` (label -1 = padding) -> ``pad_targets``' triple."""
    boxes, labels = targets.get("boxes"), targets.get("labels")
    if not isinstance(boxes, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("padded targets must be a dict with tensors 'boxes' [N, M, 4] and 'labels' [N, M]")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch_size or boxes.shape[1] < 1:
        raise ValueError(f"padded targets' boxes must have shape [{batch_size}, M >= 1, 4], got {tuple(boxes.shape)}")
    if tuple(labels.shape) != tuple(boxes.shape[:2]) or labels.is_floating_point():
        raise ValueError(f"padded targets' labels must be integers of shape {tuple(boxes.shape[:2])}, got "
                         f"{labels.dtype} {tuple(labels.shape)}")  # fmt: skip
    labels = labels.to(device=device, dtype=torch.int64)
    valid = labels >= 0
    # Padding rows become the same harmless unit box as in pad_targets: an image without boxes matches
    # every anchor to row 0, and a zero-area box there gives inf/NaN in the (masked) box loss, whose
    # backward turns 0 * NaN into NaN gradients.
    unit = (torch.arange(4, device=device) >= 2).float()  # [0, 0, 1, 1], made on the device: no copy
    boxes = torch.where(valid[..., None], boxes.to(device=device, dtype=torch.float32), unit)
    return boxes, labels.clamp(min=0), valid


def check_targets(
    boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_classes: int, image_size: tuple[int, int] | None
) -> None:
    """``ValueError`` for a degenerate box, a box outside the image, or a label outside ``[0, K)``.
    One host sync for the whole batch; the message names the first offending image and box."""
    bad_box = (boxes[..., 2] <= boxes[..., 0]) | (boxes[..., 3] <= boxes[..., 1]) | ~torch.isfinite(boxes).all(-1)
    outside = (boxes[..., :2] < 0).any(-1)
    if image_size is not None:
        outside |= (boxes[..., 2] > image_size[1]) | (boxes[..., 3] > image_size[0])
    bad_label = (labels < 0) | (labels >= num_classes)
    bad = (bad_box | outside | bad_label) & valid
    if not bool(bad.any()):
        return
    i, j = (int(v) for v in bad.nonzero()[0])
    box, label = boxes[i, j].tolist(), int(labels[i, j])
    if bad_label[i, j]:
        raise ValueError(f"targets[{i}] box {j}: label {label} is outside [0, {num_classes})")
    if bad_box[i, j]:
        raise ValueError(f"targets[{i}] box {j} {box} is degenerate: need x2 > x1 and y2 > y1 (xyxy pixels)")
    raise ValueError(f"targets[{i}] box {j} {box} lies outside the image {image_size} (xyxy pixels, H x W)")
