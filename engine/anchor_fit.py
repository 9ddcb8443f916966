"""Anchor sizes, scales and ratios searched to cover a data set's boxes better, at the same anchor count.

The objective is the share of boxes that the model's own matcher gives a foreground anchor (``fg`` of
``engine.anchor_coverage``; fewer boxes with best IoU under ``bg_iou_thresh`` break ties), on a sample of
the images. Coordinate descent, one family at a time, each keeping five sizes (one per level P3..P7),
``len(anchor_scales)`` and ``len(anchor_ratios)``, so the head and its cost do not change:

- sizes: the current sizes times ``2 ** (k / 4)``, ``k = -4..4`` (the octave between levels kept);
- ratios (h / w): ``c * r ** (j - (n - 1) / 2)`` for ``j < n``, ``c`` 1 or the boxes' median h / w,
  ``r`` in ``SPREADS`` (one ratio: ``c`` alone);
- scales: ``2 ** (j * o / n)`` for ``j < n``, octave span ``o`` in ``SPANS`` (the paper's is 1).

The fit is a starting point for ``jobs/tune.py --space anchors --anchors-from REPORT``, which searches AP
around it: coverage is necessary for AP, not sufficient.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, replace

from engine.anchor_coverage import dataset_coverage
from engine.config import format_override
from model.config import RetinaNetConfig

SIZE_STEPS = tuple(2 ** (k / 4) for k in range(-4, 5))
SPREADS = (1.5, 2.0, 3.0, 4.0)
SPANS = (0.5, 0.75, 1.0, 1.25)
ROUNDS = 2


@dataclass(frozen=True)
class Anchors:
    sizes: tuple[float, ...]
    scales: tuple[float, ...]
    ratios: tuple[float, ...]

    @classmethod
    def of(cls, cfg: RetinaNetConfig) -> Anchors:
        return cls(tuple(cfg.anchor_sizes), tuple(cfg.anchor_scales), tuple(cfg.anchor_ratios))

    def applied(self, cfg: RetinaNetConfig) -> RetinaNetConfig:
        return replace(cfg, anchor_sizes=self.sizes, anchor_scales=self.scales, anchor_ratios=self.ratios)

    def overrides(self) -> list[str]:
        """The ``--set`` items (``model.anchor_sizes=[...]`` ...) that give these anchors."""
        values = {"anchor_sizes": self.sizes, "anchor_scales": self.scales, "anchor_ratios": self.ratios}
        return [format_override(f"model.{k}", v) for k, v in values.items()]


@dataclass
class AnchorFit:
    """The fitted anchors, and the coverage (``Coverage.shares`` of all boxes) before and after."""

    start: Anchors
    fitted: Anchors
    before: dict
    after: dict
    fit_images: int
    candidates: int

    def set_line(self) -> str:
        return " ".join(f"--set {item}" for item in self.fitted.overrides())

    def report(self) -> dict:
        return {"set": self.fitted.overrides(), "set_line": self.set_line(), "before": self.before,
                "after": self.after, "fit_images": self.fit_images, "candidates": self.candidates,
                "anchors_per_location": len(self.fitted.scales) * len(self.fitted.ratios)}  # fmt: skip


def candidates(current: Anchors, family: str, median_ratio: float) -> list[Anchors]:
    """The anchors of one family (``sizes``, ``ratios`` or ``scales``) around ``current``, same counts."""
    if family == "sizes":
        return [replace(current, sizes=tuple(round(s * f, 1) for s in current.sizes)) for f in SIZE_STEPS]
    if family == "ratios":
        n = len(current.ratios)
        centres = sorted({1.0, round(median_ratio, 3)})
        spreads = SPREADS if n > 1 else (1.0,)
        return [
            replace(current, ratios=tuple(round(c * r ** (j - (n - 1) / 2), 3) for j in range(n)))
            for c in centres
            for r in spreads
        ]
    n = len(current.scales)
    return [replace(current, scales=tuple(round(2 ** (j * o / n), 4) for j in range(n))) for o in SPANS]


def fit_anchors(
    ground_truth: dict,
    cfg: RetinaNetConfig,
    eval_size: int,
    max_size: int,
    *,
    max_images: int = 64,
    seed: int = 0,
    before: dict | None = None,
) -> AnchorFit:
    """Fits the anchors of ``cfg`` to the non-crowd boxes of a COCO ``ground_truth`` after the eval resize
    (see the module doc); the search sees at most ``max_images`` images, the before/after figures all.
    ``before``: the start's ``Coverage.shares()`` on all boxes when the caller has it already."""
    sample = _sample(ground_truth, max_images, seed)
    start = best = Anchors.of(cfg)
    ratios = [a["bbox"][3] / a["bbox"][2] for a in sample["annotations"] if a["bbox"][2] > 0]
    median_ratio = statistics.median(ratios) if ratios else 1.0

    def score(anchors: Anchors) -> tuple[float, float]:
        s = dataset_coverage(sample, anchors.applied(cfg), eval_size, max_size).shares()
        return s["fg"], -s["below_bg"]

    scores = {best: score(best)}
    for _ in range(ROUNDS):
        previous = best
        for family in ("sizes", "ratios", "scales"):
            for c in candidates(best, family, median_ratio):
                if c not in scores:
                    scores[c] = score(c)
            best = max(scores, key=lambda a: (scores[a], a == best))
        if best == previous:
            break
    before = before or dataset_coverage(ground_truth, cfg, eval_size, max_size).shares()
    after = before if best == start else dataset_coverage(ground_truth, best.applied(cfg), eval_size, max_size).shares()
    return AnchorFit(start, best, before, after, len(sample["images"]), len(scores))


def _sample(ground_truth: dict, max_images: int, seed: int) -> dict:
    """A seeded sample of at most ``max_images`` of the images that have non-crowd boxes."""
    anns = [a for a in ground_truth["annotations"] if not a.get("iscrowd")]
    with_boxes = sorted({a["image_id"] for a in anns})
    chosen = set(random.Random(seed).sample(with_boxes, min(max_images, len(with_boxes))))
    return {
        "images": [im for im in ground_truth["images"] if im["id"] in chosen],
        "annotations": [a for a in anns if a["image_id"] in chosen],
        "categories": ground_truth["categories"],
    }


def centred_ratios(ratios: tuple[float, ...], stretch: float) -> tuple[float, ...]:
    """``ratios`` with their log spread around their geometric centre times ``stretch`` (one ratio: the
    ratio times ``stretch``), for a search around fitted anchors."""
    if len(ratios) == 1:
        return (round(ratios[0] * stretch, 3),)
    centre = sum(math.log(r) for r in ratios) / len(ratios)
    return tuple(round(math.exp(centre + (math.log(r) - centre) * stretch), 3) for r in ratios)
