"""Per-class figures and operating points from pycocotools' own accumulated arrays (no second matcher).

``COCOeval.accumulate()`` leaves ``eval["precision"]`` and ``eval["scores"]``, each ``[T, R, K, A, M]``:
IoU thresholds (0.5:0.05:0.95), 101 recall points, categories, area ranges (all, small, medium, large) and
max detections (1, 10, 100). Precision there is interpolated (the best precision at any recall >= r, as
COCO AP is computed), and -1 where a class has no ground truth. For each class, at area "all" and 100
detections:

- ``AP``: the mean of its precision over IoU thresholds and recall points (pycocotools' AP, per class);
- ``AP50``, ``AP75``: the same at IoU 0.5 and 0.75;
- ``gt``: its non-crowd ground-truth boxes in the evaluated images;
- ``threshold``, ``precision``, ``recall``: the recall point at IoU 0.5 with the best F1 = 2PR / (P + R),
  the score of the detection that reaches it, and P and R there (an operating point to deploy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IOU_50, IOU_75 = 0, 5  # indexes into COCOeval.params.iouThrs


@dataclass
class ClassResult:
    name: str
    category_id: int
    gt: int
    AP: float
    AP50: float
    AP75: float
    threshold: float  # the score at the best F1 at IoU 0.5 (1.0 when nothing was detected)
    precision: float
    recall: float
    f1: float
    curve50: list[float] = field(default_factory=list, repr=False)  # precision at the 101 recall points, IoU 0.5
    curve75: list[float] = field(default_factory=list, repr=False)  # the same at IoU 0.75


def _mean(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class(evaluator) -> list[ClassResult]:
    """One ``ClassResult`` per category of an evaluated and accumulated ``COCOeval`` (bbox)."""
    precision, scores = evaluator.eval["precision"], evaluator.eval["scores"]
    recall_points = np.asarray(evaluator.params.recThrs)
    truth = evaluator.cocoGt
    out = []
    for k, cat in enumerate(evaluator.params.catIds):
        p50 = precision[IOU_50, :, k, 0, -1]
        ann_ids = truth.getAnnIds(imgIds=evaluator.params.imgIds, catIds=[cat], iscrowd=False)
        gt = len(ann_ids)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p50 > 0, 2 * p50 * recall_points / (p50 + recall_points), 0.0)
        best = int(f1.argmax())
        found = gt > 0 and f1[best] > 0
        out.append(
            ClassResult(
                name=truth.cats[cat]["name"], category_id=int(cat), gt=gt,
                AP=_mean(precision[:, :, k, 0, -1]), AP50=_mean(p50), AP75=_mean(precision[IOU_75, :, k, 0, -1]),
                threshold=float(scores[IOU_50, best, k, 0, -1]) if found else 1.0,
                precision=float(p50[best]) if found else 0.0, recall=float(recall_points[best]) if found else 0.0,
                f1=float(f1[best]) if found else 0.0,
                curve50=p50.tolist(), curve75=precision[IOU_75, :, k, 0, -1].tolist(),
            )
        )  # fmt: skip
    return out


def flat_metrics(classes: list[ClassResult]) -> dict[str, float]:
    """``AP/<name>`` and ``AP50/<name>`` (what ``jobs/tune.py --metric`` ranks by), then ``gt/<name>`` and the
    best-F1 ``P50/<name>``, ``R50/<name>`` at IoU 0.5: for metrics.jsonl, TensorBoard and Ray's reports."""
    out: dict[str, float] = {}
    for c in classes:
        out[f"AP/{c.name}"] = c.AP
        out[f"AP50/{c.name}"] = c.AP50
    for c in classes:
        out[f"gt/{c.name}"] = float(c.gt)
        out[f"P50/{c.name}"] = c.precision
        out[f"R50/{c.name}"] = c.recall
    return out


def thresholds(classes: list[ClassResult]) -> dict:
    """The content of ``thresholds.json``: per class name, the best-F1 score threshold at IoU 0.5 and its
    precision, recall and F1 (and the class's ground-truth count)."""
    return {
        "rule": "per class, the score that maximises F1 at IoU 0.5 (pycocotools' interpolated precision)",
        "classes": {c.name: {"category_id": c.category_id, "threshold": c.threshold, "precision": c.precision,
                             "recall": c.recall, "f1": c.f1, "gt": c.gt} for c in classes},
    }  # fmt: skip


def format_table(classes: list[ClassResult]) -> str:
    """One line per class: gt boxes, AP, AP50, AP75 and the best-F1 operating point at IoU 0.5."""
    width = max([5, *(len(c.name) for c in classes)])
    lines = [f"{'class':<{width}}  {'gt':>5}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}  {'thresh':>6}  {'P@.5':>6}  "
             f"{'R@.5':>6}"]  # fmt: skip

    def v(x: float) -> str:
        return "   n/a" if x < 0 else f"{x:6.3f}"

    for c in classes:
        lines.append(f"{c.name:<{width}}  {c.gt:>5}  {v(c.AP)}  {v(c.AP50)}  {v(c.AP75)}  {c.threshold:6.3f}  "
                     f"{c.precision:6.3f}  {c.recall:6.3f}")  # fmt: skip
    return "\n".join(lines)


def plot_pr_curves(classes: list[ClassResult], uri: str) -> None:
    """Precision against recall per class at IoU 0.5 and 0.75 (pycocotools' interpolated curves), the
    best-F1 point marked; a grid of panels written as a PNG to ``uri`` (local or object storage)."""
    import io
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline import storage

    shown = [c for c in classes if c.gt > 0] or classes
    cols = min(6, max(1, len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.4 * rows), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    recall = np.linspace(0.0, 1.0, 101)
    for ax, c in zip(axes, shown, strict=False):
        for curve, label in ((c.curve50, "IoU 0.5"), (c.curve75, "IoU 0.75")):
            if curve:
                ax.plot(recall, np.clip(curve, 0, None), label=label)
        ax.plot([c.recall], [c.precision], "k.", markersize=8)
        ax.set(
            title=f"{c.name} (AP50 {max(c.AP50, 0):.2f}, n={c.gt})",
            xlim=(0, 1),
            ylim=(0, 1.02),
            xlabel="recall",
            ylabel="precision",
        )
        ax.title.set_fontsize(8)
    for ax in axes[len(shown) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(uri, buffer.getvalue())
