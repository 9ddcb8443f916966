"""The doctor's pictures: box sizes and aspect ratios after the eval resize against the anchors of each FPN
level (``sizes.png``), and a few images with their ground truth and the anchors the matcher gives each box
(``anchors.png``)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.anchor_coverage import anchor_generator, assign, eval_scale
from engine.visualize import class_color, dashed_rectangle, grid
from model.config import RetinaNetConfig
from pipeline import storage
from pipeline.reader import Sample, ShardStream

DISPLAY_PX = 480
LEVEL_COLORS = ("#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd")


def resized_boxes(ground_truth: dict, eval_size: int, max_size: int) -> np.ndarray:
    """``[B, 2]`` (width, height) in pixels of every non-crowd box after the evaluation resize."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in ground_truth["images"]}
    out = []
    for a in ground_truth["annotations"]:
        if not a.get("iscrowd"):
            s = eval_scale(*sizes[a["image_id"]], eval_size, max_size)
            out.append((a["bbox"][2] * s, a["bbox"][3] * s))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def plot_sizes(ground_truth: dict, cfg: RetinaNetConfig, eval_size: int, max_size: int, uri: str) -> None:
    """Three panels: sqrt(w h) of the boxes with each level's anchor sides (size x scale), h / w with the
    anchor ratios, and the images' sizes; written as a PNG to ``uri`` (local or object storage)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    wh = resized_boxes(ground_truth, eval_size, max_size)
    fig = Figure(figsize=(15, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_side, ax_ratio, ax_image = fig.subplots(1, 3)
    side = np.sqrt(wh.prod(axis=1)) if len(wh) else np.ones(1)
    top = max(side.max(), cfg.anchor_sizes[-1] * max(cfg.anchor_scales)) * 1.2
    ax_side.hist(side, bins=np.geomspace(1, top, 60), color="0.6")
    for level, (size, color) in enumerate(zip(cfg.anchor_sizes, LEVEL_COLORS, strict=True)):
        for j, scale in enumerate(cfg.anchor_scales):
            ax_side.axvline(size * scale, color=color, lw=1.2, label=f"P{level + 3}" if j == 0 else None)
    ax_side.set(xscale="log", title="box side sqrt(w h) after the eval resize, anchors per level",
                xlabel="pixels", ylabel="boxes")  # fmt: skip
    ax_side.legend(fontsize=8)
    ratio = wh[:, 1] / np.maximum(wh[:, 0], 1e-6) if len(wh) else np.ones(1)
    ax_ratio.hist(ratio, bins=np.geomspace(max(ratio.min(), 1 / 20), min(ratio.max(), 20) * 1.01, 50), color="0.6")
    for r in cfg.anchor_ratios:
        ax_ratio.axvline(r, color="k", lw=1.2)
    ax_ratio.set(xscale="log", title="box aspect ratio h / w, anchor ratios", xlabel="h / w", ylabel="boxes")
    widths = [im["width"] for im in ground_truth["images"]]
    heights = [im["height"] for im in ground_truth["images"]]
    ax_image.scatter(widths, heights, s=8, alpha=0.5)
    ax_image.set(title=f"image sizes (eval resize: {eval_size}, at most {max_size})", xlabel="width",
                 ylabel="height")  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(uri, buffer.getvalue())


def first_samples(shard_uris: list[str], count: int) -> list[Sample]:
    """The first ``count`` samples with (non-crowd) boxes, reading the shards in order as evaluation does."""
    from itertools import islice

    stream = ShardStream(shard_uris, group=0, num_groups=1, train=False, read_ahead=False)
    return list(islice((s for s in stream if len(s.boxes)), count))


def draw_assignment(
    sample: Sample, cfg: RetinaNetConfig, eval_size: int, max_size: int, generator, show: int = 3
) -> Image.Image:
    """The image after the eval resize (shown at most ``DISPLAY_PX`` wide) with each box (thick, its class
    colour) and its ``show`` best assigned anchors (thin; dashed where no anchor reaches IoU >= fg_iou_thresh,
    so its best anchor is drawn: a box the anchors do not fit)."""
    s = eval_scale(sample.height, sample.width, eval_size, max_size)
    size = (round(sample.width * s), round(sample.height * s))
    d = min(1.0, DISPLAY_PX / max(size))
    image = Image.open(io.BytesIO(sample.jpeg)).convert("RGB").resize((round(size[0] * d), round(size[1] * d)))
    if not len(sample.boxes):
        return image
    boxes = torch.from_numpy(sample.boxes).float().reshape(-1, 4) * s
    draw = ImageDraw.Draw(image)
    anchors, iou, matches, _ = assign(boxes, (size[1], size[0]), cfg, generator)
    for m, label in enumerate(sample.labels.tolist()):
        color = class_color(int(label))
        mine = (matches == m).nonzero().flatten()
        strong = mine[iou[m, mine] >= cfg.fg_iou_thresh]
        if len(strong):
            for a in strong[iou[m, strong].argsort(descending=True)[:show]].tolist():
                draw.rectangle(tuple((anchors[a] * d).tolist()), outline=color, width=1)
        else:
            dashed_rectangle(draw, (anchors[int(iou[m].argmax())] * d).tolist(), fill=color, width=1, dash=4)
        draw.rectangle(tuple((boxes[m] * d).tolist()), outline=color, width=3)
    return image


def plot_assignments(
    shard_uris: list[str], cfg: RetinaNetConfig, eval_size: int, max_size: int, uri: str, count: int = 6
) -> int:
    """``count`` images with their boxes and assigned anchors in a grid PNG at ``uri``; returns how many."""
    samples = first_samples(shard_uris, count)
    if not samples:
        return 0
    generator = anchor_generator(cfg)
    images = [draw_assignment(sample, cfg, eval_size, max_size, generator) for sample in samples]
    buffer = io.BytesIO()
    grid(images, cols=3).save(buffer, format="PNG")
    storage.write_bytes(uri, buffer.getvalue())
    return len(images)
