"""How well the anchors fit a data set's boxes, with the model's own anchor generator and matcher.

For each ground-truth box (in the pixels of the evaluation resize, on the image padded to a multiple of
128 as the model sees it): its best anchor IoU and that anchor's FPN level, and how the matcher
(``model.boxes.match``, the training rule) treats it:

- ``fg``: some anchor matched to it reaches IoU >= ``fg_iou_thresh``;
- ``low_quality``: it is matched only through the low-quality rule (its best anchors, below the threshold);
- ``unmatched``: no anchor is assigned to it (a box the loss never learns from).

``below_bg`` counts boxes whose best IoU is under ``bg_iou_thresh`` (mostly also low-quality matches).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from model.anchors import AnchorGenerator, level_sizes
from model.boxes import batched_box_iou, match
from model.config import RetinaNetConfig

KINDS = ("fg", "low_quality", "unmatched")
SIZE_DIVISOR = 128


@dataclass
class BoxFit:
    best_iou: float
    level: int  # 3..7: the FPN level of the best anchor
    kind: str  # one of KINDS


@dataclass
class Coverage:
    """Per-box fits and labels of a data set; ``report`` gives the shares overall, per class and per level."""

    bg_iou_thresh: float
    boxes: list[BoxFit] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def shares(self, where=lambda i: True) -> dict[str, float]:
        chosen = [b for i, b in enumerate(self.boxes) if where(i)]
        counts = Counter(b.kind for b in chosen)
        n = max(1, len(chosen))
        out: dict[str, float] = {k: counts[k] / n for k in KINDS}
        out["below_bg"] = sum(1 for b in chosen if b.best_iou < self.bg_iou_thresh) / n
        out["boxes"] = len(chosen)
        return out

    def report(self, names: dict[int, str]) -> dict:
        classes = sorted(set(self.labels))
        per_class = {names.get(c, str(c)): self.shares(lambda i, c=c: self.labels[i] == c) for c in classes}
        levels = sorted({b.level for b in self.boxes})
        per_level = {f"P{lv}": self.shares(lambda i, lv=lv: self.boxes[i].level == lv) for lv in levels}
        return {"overall": self.shares(), "per_class": per_class, "per_level": per_level}


def padded(size: int) -> int:
    return max(SIZE_DIVISOR, math.ceil(size / SIZE_DIVISOR) * SIZE_DIVISOR)


def anchor_generator(cfg: RetinaNetConfig) -> AnchorGenerator:
    return AnchorGenerator(cfg.anchor_sizes, cfg.anchor_scales, cfg.anchor_ratios, cfg.anchor_round)


def assign(
    boxes: torch.Tensor, image_size: tuple[int, int], cfg: RetinaNetConfig, generator: AnchorGenerator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The training assignment of ``boxes [M, 4]`` (xyxy, M >= 1) in a resized image of ``image_size (h, w)``,
    padded as the model pads it: ``(anchors [A, 4], iou [M, A], matches [A], anchors per level)``, where
    ``matches[a]`` is the box of anchor ``a`` (-1 background, -2 ignored), from the model's own generator
    and ``model.boxes.match``. ``generator``: one shared over many images (it caches each padded size)."""
    size = (padded(image_size[0]), padded(image_size[1]))
    generator = generator or anchor_generator(cfg)
    anchors, per_level = generator(size, level_sizes(size), torch.device("cpu"), torch.float32)
    iou = batched_box_iou(boxes[None].float(), anchors)  # [1, M, A]
    valid = torch.ones(1, len(boxes), dtype=torch.bool)
    matches = match(iou, valid, cfg.fg_iou_thresh, cfg.bg_iou_thresh, cfg.allow_low_quality_matches)[0]
    return anchors, iou[0], matches, list(per_level)


def image_coverage(
    boxes: torch.Tensor, image_size: tuple[int, int], cfg: RetinaNetConfig, generator: AnchorGenerator | None = None
) -> list[BoxFit]:
    """``boxes [M, 4]`` xyxy in the resized image of ``image_size (h, w)`` -> one ``BoxFit`` each."""
    if len(boxes) == 0:
        return []
    _, iou, matches, per_level = assign(boxes, image_size, cfg, generator)
    best_iou, best_anchor = iou.max(dim=1)
    bounds = torch.tensor(per_level).cumsum(0)
    fits = []
    for m in range(len(boxes)):
        mine = matches == m
        if (mine & (iou[m] >= cfg.fg_iou_thresh)).any():
            kind = "fg"
        else:
            kind = "low_quality" if mine.any() else "unmatched"
        level = 3 + int((bounds <= best_anchor[m]).sum())
        fits.append(BoxFit(float(best_iou[m]), level, kind))
    return fits


def eval_scale(height: int, width: int, eval_size: int, max_size: int) -> float:
    """The evaluation resize: shorter side to ``eval_size``, longer side at most ``max_size``."""
    return min(eval_size / min(height, width), max_size / max(height, width))


def dataset_coverage(ground_truth: dict, cfg: RetinaNetConfig, eval_size: int, max_size: int) -> Coverage:
    """Coverage of every non-crowd box of a COCO ground truth (``ground_truth.json``) after the eval resize."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in ground_truth["annotations"]:
        if not a.get("iscrowd"):
            by_image[a["image_id"]].append(a)
    label_of = {c["id"]: i for i, c in enumerate(sorted(ground_truth["categories"], key=lambda c: c["id"]))}
    out = Coverage(cfg.bg_iou_thresh)
    generator = anchor_generator(cfg)
    for im in ground_truth["images"]:
        anns = by_image.get(im["id"], [])
        s = eval_scale(im["height"], im["width"], eval_size, max_size)
        boxes = torch.tensor([[x * s, y * s, (x + w) * s, (y + h) * s] for x, y, w, h in (a["bbox"] for a in anns)])
        size = (round(im["height"] * s), round(im["width"] * s))
        out.boxes += image_coverage(boxes.reshape(-1, 4), size, cfg, generator)
        out.labels += [label_of[a["category_id"]] for a in anns]
    return out
