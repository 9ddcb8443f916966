"""Pictures of a run: detections drawn on images, image grids, loss and AP curves (PIL and matplotlib)."""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline import storage

# ImageNet mean / std in 0..255 units, as pipeline/dali.py normalises (a test keeps the two equal; importing
# pipeline.dali here would load DALI just to draw a picture).
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def denormalize(images_chw_float: torch.Tensor) -> np.ndarray:
    """Undoes the ImageNet normalisation: ``[3, H, W]`` -> ``[H, W, 3]`` or ``[N, 3, H, W]`` -> ``[N, H, W, 3]``
    uint8 RGB (rounded, clipped to 0..255)."""
    x = images_chw_float.detach().float().cpu()
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected [3, H, W] or [N, 3, H, W] images, got shape {tuple(x.shape)}")
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    pixels = (x * std + mean).round().clamp(0, 255).to(torch.uint8)
    return pixels.movedim(-3, -1).contiguous().numpy()


def class_color(label: int) -> tuple[int, int, int]:
    """A bright colour per class; neighbouring labels get distant hues (golden-ratio steps)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_detections(
    image_uint8_hwc: np.ndarray,
    boxes,
    labels,
    scores,
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.3,
    gt_boxes=None,
    gt_labels=None,
) -> Image.Image:
    """Draws detections (xyxy pixels of this image) with scores >= ``score_thresh``, coloured by class and
    labelled ``"name 0.87"``; ground truth, when given, as dashed white boxes under them."""
    image = Image.fromarray(np.ascontiguousarray(image_uint8_hwc, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 300))
    font = _font(max(11, round(min(image.size) / 40)))
    if gt_boxes is not None:
        for box in _array(gt_boxes).reshape(-1, 4):
            dashed_rectangle(draw, box, fill=(255, 255, 255), width=max(1, width - 1), dash=3 * width + 3)
    boxes, labels, scores = _array(boxes).reshape(-1, 4), _array(labels).reshape(-1), _array(scores).reshape(-1)
    order = np.argsort(scores, kind="stable")  # highest score drawn last, on top
    for i in order:
        if scores[i] < score_thresh:
            continue
        label = int(labels[i])
        color = class_color(label)
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the top edge
        tx = min(max(0.0, x0), max(0.0, image.width - tw))
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_color(color), font=font)
    return image


def grid(images: Sequence[Image.Image], cols: int) -> Image.Image:
    """Images in rows of ``cols`` cells (each cell the size of the largest image), on a dark background."""
    if not images:
        raise ValueError("grid() needs at least one image")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    pad = 4
    cell_w = max(im.width for im in images) + pad
    cell_h = max(im.height for im in images) + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (32, 32, 32))
    for i, im in enumerate(images):
        canvas.paste(im.convert("RGB"), (pad + (i % cols) * cell_w, pad + (i // cols) * cell_h))
    return canvas


def save_png(image: Image.Image, path_or_uri: str | Path) -> None:
    """Writes ``image`` as PNG to a local path or an object-storage URI (``s3://``, ``gs://``, ``file://``)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(str(path_or_uri), buffer.getvalue())


def plot_curves(history: Sequence[dict], path: str | Path) -> None:
    """Two panels from metrics.jsonl-like records (``step`` plus any of ``loss``, ``loss_cls``, ``loss_box``,
    ``AP``, ``AP50``): losses vs step and AP vs step, written as a PNG to ``path`` (local or URI).

    Uses matplotlib's Agg canvas on a bare ``Figure`` (no pyplot), so no global backend is switched and it is
    safe off the main thread. AP values of -1 (no objects) are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ap = fig.subplots(1, 2)
    panels = (
        (ax_loss, ("loss", "loss_cls", "loss_box"), "training loss", "loss"),
        (ax_ap, ("AP", "AP50"), "COCO box AP", "AP"),
    )
    for ax, keys, title, ylabel in panels:
        plotted = False
        for key in keys:
            points = [
                (float(h["step"]), float(h[key]))
                for h in history
                if "step" in h and h.get(key) is not None and _finite(h[key]) and float(h[key]) >= 0
            ]
            if points:
                steps, values = zip(*sorted(points), strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
                plotted = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(str(path), buffer.getvalue())


def _array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def dashed_rectangle(draw: ImageDraw.ImageDraw, box, *, fill, width: int, dash: int) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = math.hypot(bx - ax, by - ay)
        if length == 0:
            continue
        for start in np.arange(0.0, length, 2 * dash):
            end = min(start + dash, length)
            p = (ax + (bx - ax) * start / length, ay + (by - ay) * start / length)
            q = (ax + (bx - ax) * end / length, ay + (by - ay) * end / length)
            draw.line((p, q), fill=fill, width=width)
