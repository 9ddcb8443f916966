"""A deterministic synthetic detection dataset (COCO format) that a small RetinaNet learns on a CPU.

Five classes of filled shapes, each in its own colour family (hue, saturation and brightness jittered
per object): circle (red), rectangle (blue, aspect 1:2 to 2:1), triangle (green, four orientations),
cross (yellow), ring (magenta). They lie on a textured background (a smooth random colour field plus
pixel noise) with thin distractor lines that are not objects. Longer sides run from 10 px to
``MAX_SIDE_FRACTION`` of the image, about 45 % of them below 32 px so COCO's APs means something;
0-8 objects per image (``ZERO_OBJECT_FRACTION`` of the images have none). Objects may overlap a little
(each keeps at least ``MIN_VISIBLE`` of its pixels, and at most ``MAX_BOX_OVERLAP`` of the smaller of two
boxes lies inside the other), never hide one another or sit inside another.

A second class set, ``marks`` (``CLASS_SETS``), has three other classes in other colours for fine-tuning
experiments: diamond (cyan), frame (a hollow square, orange) and star (five points, violet).

Each object is drawn on a binary mask layer first and painted through it, so its box is the exact
extent of its visible pixels (``bbox = [x0, y0, x1 + 1 - x0, y1 + 1 - y0]`` for inclusive pixel indices
x0..x1, y0..y1) and its ``area`` is their count. Image ``i`` of a split is drawn from its own generator,
seeded with ``(seed, split, i)``: the same seed gives the same bytes on every run, and the validation
split is a stream disjoint from the training one.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# (name, hue in [0, 1)) of each class; COCO category id = index + 1.
CLASSES: tuple[tuple[str, float], ...] = (
    ("circle", 0.0),
    ("rectangle", 0.62),
    ("triangle", 0.33),
    ("cross", 0.15),
    ("ring", 0.83),
)
MARKS: tuple[tuple[str, float], ...] = (
    ("diamond", 0.5),
    ("frame", 0.07),
    ("star", 0.74),
)
CLASS_SETS = {"shapes": CLASSES, "marks": MARKS}
SPLITS = ("train", "val")
MIN_SIDE = 10  # px, longer side of the smallest objects
MAX_SIDE_FRACTION = 0.55  # of the image size, longer side of the largest objects
SIZE_BUCKETS = ((0.45, 10, 30), (0.35, 34, 92), (0.20, 100, None))  # (share, min side, max side or None)
MAX_OBJECTS = 8
ZERO_OBJECT_FRACTION = 0.05
MIN_VISIBLE = 0.7  # share of an object's own pixels that must stay visible
MAX_BOX_OVERLAP = 0.4  # intersection over the smaller box's area
JPEG_QUALITY = 90
AREA_RANGES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, math.inf))  # COCO's
_PLACEMENT_TRIES = 30


@dataclass
class SceneObject:
    """One drawn object: its category id, tight box ``[x, y, w, h]`` (pixels) and visible pixel count."""

    category_id: int
    bbox: list[int]
    area: int


@dataclass
class Scene:
    """An image before JPEG encoding. ``instances`` (H, W) int16: 0 background, k the k-th object (1-based)."""

    image: np.ndarray
    instances: np.ndarray
    objects: list[SceneObject]


def categories(classes: tuple[tuple[str, float], ...] = CLASSES) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _) in enumerate(classes)]


def class_set(name: str) -> tuple[tuple[str, float], ...]:
    if name not in CLASS_SETS:
        raise ValueError(f"unknown class set {name!r}; valid: {', '.join(CLASS_SETS)}")
    return CLASS_SETS[name]


def render(rng: np.random.Generator, image_size: int, classes: tuple[tuple[str, float], ...] = CLASSES) -> Scene:
    """One image (H = W = ``image_size``, RGB uint8) with objects of ``classes``; uses only ``rng``."""
    if image_size < 4 * MIN_SIDE:
        raise ValueError(f"image_size must be at least {4 * MIN_SIDE} px (got {image_size})")
    image = _background(rng, image_size)
    instances = np.zeros((image_size, image_size), np.int16)
    num_objects = 0 if rng.random() < ZERO_OBJECT_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    # Larger objects first, so smaller ones land on top of them and stay whole.
    plans = sorted((_sample_side(rng, image_size), int(rng.integers(len(classes)))) for _ in range(num_objects))
    placed: list[tuple[int, list[int]]] = []  # (category id, full-mask box xyxy inclusive)
    for side, cls in reversed(plans):
        mask = _shape_mask(rng, classes[cls][0], side)
        spot = _place(rng, mask, instances, [box for _, box in placed])
        if spot is None:
            continue
        y, x = spot
        h, w = mask.shape
        region = instances[y : y + h, x : x + w]
        region[mask] = len(placed) + 1
        image[y : y + h, x : x + w][mask] = _colour(rng, classes[cls][1])
        placed.append((cls + 1, [x, y, x + w - 1, y + h - 1]))
    noise = rng.normal(0.0, 6.0, image.shape).astype(np.float32)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    objects = []
    for k, (category_id, (x0, y0, x1, y1)) in enumerate(placed, start=1):
        visible = instances[y0 : y1 + 1, x0 : x1 + 1] == k
        ys, xs = np.nonzero(visible)
        bx0, by0 = x0 + int(xs.min()), y0 + int(ys.min())
        bx1, by1 = x0 + int(xs.max()), y0 + int(ys.max())
        objects.append(SceneObject(category_id, [bx0, by0, bx1 + 1 - bx0, by1 + 1 - by0], int(visible.sum())))
    return Scene(image=image, instances=instances, objects=objects)


def generate(
    output_dir: Path, *, num_train: int, num_val: int, image_size: int = 256, seed: int = 0, classes: str = "shapes"
) -> dict:
    """Writes ``output_dir/{train,val}/images/*.jpg`` and ``.../annotations.json``; returns a summary.
    ``classes``: the class set (``CLASS_SETS``); ``shapes`` gives the same bytes as before sets existed.

    The summary holds per split the image, object and zero-object-image counts, objects per class,
    objects per COCO area range, a histogram of longer box sides and of objects per image.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0 (got {num_train}, {num_val})")
    if image_size < 4 * MIN_SIDE:
        raise ValueError(f"image_size must be at least {4 * MIN_SIDE} px (got {image_size})")
    output_dir = Path(output_dir)
    chosen = class_set(classes)
    summary: dict[str, Any] = {"image_size": image_size, "seed": seed, "classes": [n for n, _ in chosen]}
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val), strict=True)):
        images_dir = output_dir / split / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": categories(chosen)}
        for i in range(count):
            scene = render(np.random.default_rng([seed, split_index, i]), image_size, chosen)
            file_name = f"{i:06d}.jpg"
            Image.fromarray(scene.image).save(images_dir / file_name, quality=JPEG_QUALITY)
            image_id = i + 1
            coco["images"].append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            for obj in scene.objects:
                coco["annotations"].append(
                    {"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": obj.category_id,
                     "bbox": obj.bbox, "area": obj.area, "iscrowd": 0}
                )  # fmt: skip
        (output_dir / split / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
        summary[split] = summarize(coco)
    return summary


def summarize(coco: dict[str, Any]) -> dict[str, Any]:
    """Counts of a COCO dict: images, objects, zero-object images, per class, per area range, side histogram."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    edges = [0, 16, 32, 64, 96, 128, 256, 512]
    side_hist = {}
    for lo, hi in zip(edges, [*edges[1:], math.inf], strict=True):
        key = f"{lo}-{hi}" if hi != math.inf else f">={lo}"
        side_hist[key] = sum(lo <= s < hi for s in sides)
    per_class = Counter(a["category_id"] for a in coco["annotations"])
    return {
        "num_images": len(coco["images"]),
        "num_objects": len(coco["annotations"]),
        "num_zero_object_images": sum(im["id"] not in per_image for im in coco["images"]),
        "objects_per_class": {names[c]: n for c, n in sorted(per_class.items())},
        "objects_per_area_range": {
            name: sum(lo <= a["area"] < hi for a in coco["annotations"]) for name, lo, hi in AREA_RANGES
        },
        "longer_side_histogram": {k: v for k, v in side_hist.items() if v},
        "objects_per_image": dict(
            sorted(Counter(per_image.get(im["id"], 0) for im in coco["images"]).items())
        ),
    }  # fmt: skip


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines."""
    lines = [f"classes: {', '.join(summary['classes'])}; image size {summary['image_size']} px; seed {summary['seed']}"]
    for split in SPLITS:
        if split not in summary:
            continue
        s = summary[split]
        lines += [
            f"{split}: {s['num_images']} images, {s['num_objects']} objects, "
            f"{s['num_zero_object_images']} images without objects",
            f"  per class: {_pairs(s['objects_per_class'])}",
            f"  per COCO area range: {_pairs(s['objects_per_area_range'])}",
            f"  longer side (px): {_pairs(s['longer_side_histogram'])}",
            f"  objects per image: {_pairs(s['objects_per_image'])}",
        ]
    return "\n".join(lines)


def preview(output_dir: Path, split: str, path_png: Path, num: int = 8, *, columns: int = 4, scale: int = 2) -> Path:
    """A grid of the split's first ``num`` images, enlarged ``scale`` times, with boxes and class names."""
    split_dir = Path(output_dir) / split
    coco = json.loads((split_dir / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = coco["images"][:num]
    if not images:
        raise ValueError(f"{split_dir} has no images to preview")
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    cell_w = max(im["width"] for im in images) * scale
    cell_h = max(im["height"] for im in images) * scale
    gap = 4
    grid = Image.new("RGB", (columns * (cell_w + gap) - gap, rows * (cell_h + gap) - gap), "white")
    for n, im in enumerate(images):
        tile = Image.open(split_dir / "images" / im["file_name"]).convert("RGB")
        tile = tile.resize((im["width"] * scale, im["height"] * scale), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(tile)
        for ann in by_image.get(im["id"], []):
            x, y, w, h = (v * scale for v in ann["bbox"])
            colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(_hue(names.get(ann["category_id"])), 0.5, 1.0))
            # Outline just outside the box, so the object's own edge pixels stay visible.
            draw.rectangle([x - 1, y - 1, x + w, y + h], outline=colour)
            label = names.get(ann["category_id"], str(ann["category_id"]))
            ty = y - 12 if y >= 12 else y + h + 1
            draw.rectangle([x - 1, ty, x + 6 * len(label) + 1, ty + 11], fill=(0, 0, 0))
            draw.text((x + 1, ty), label, fill=colour)
        draw.text((4, 4), f"{im['file_name']} ({len(by_image.get(im['id'], []))})", fill=(255, 255, 255))
        grid.paste(tile, ((n % columns) * (cell_w + gap), (n // columns) * (cell_h + gap)))
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path_png)
    return path_png


# -- drawing ----------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, muted random colour field (bicubic upsampled coarse noise) with thin distractor lines."""
    cells = int(rng.integers(2, 6))
    base = rng.uniform(40, 200)
    tint = rng.uniform(-25, 25, 3)
    coarse = np.clip(base + tint + rng.normal(0, 35, (cells, cells, 3)), 0, 255).astype(np.uint8)
    field = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(2, 9))):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        grey = rng.uniform(30, 230)
        colour = tuple(int(np.clip(grey + d, 0, 255)) for d in rng.normal(0, 30, 3))
        draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(field, dtype=np.float32).copy()


def _sample_side(rng: np.random.Generator, image_size: int) -> int:
    """The longer side of a new object: a size bucket by its share, then log-uniform within it."""
    max_side = int(MAX_SIDE_FRACTION * image_size)
    buckets = [(share, lo, min(hi or max_side, max_side)) for share, lo, hi in SIZE_BUCKETS if lo < max_side]
    shares = np.array([b[0] for b in buckets])
    _, lo, hi = buckets[int(rng.choice(len(buckets), p=shares / shares.sum()))]
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _hue(name: str | None) -> float:
    hues = {n: h for classes in CLASS_SETS.values() for n, h in classes}
    return hues.get(name, 0.0)


def _shape_mask(rng: np.random.Generator, name: str, side: int) -> np.ndarray:
    """The (h, w) bool mask of one shape of class ``name`` whose longer side is ``side`` pixels."""
    if name in dict(MARKS):
        return _mark_mask(rng, name, side)
    if name == "rectangle":
        short = max(MIN_SIDE // 2, round(side * rng.uniform(0.5, 1.0)))
        w, h = (side, short) if rng.random() < 0.5 else (short, side)
    elif name in ("circle", "ring"):
        w, h = side, max(MIN_SIDE // 2, round(side * rng.uniform(0.8, 1.0)))
        w, h = (w, h) if rng.random() < 0.5 else (h, w)
    else:
        w = h = side
    layer = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    if name == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
    elif name == "rectangle":
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
    elif name == "ring":
        t = max(2, round(min(w, h) * rng.uniform(0.15, 0.25)))
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
        draw.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    elif name == "triangle":
        apex, left, right = (w / 2 - 0.5, 0), (0, h - 1), (w - 1, h - 1)
        draw.polygon([apex, left, right], fill=1)
        layer = layer.rotate(90 * int(rng.integers(4)), expand=True)
    else:  # cross: two bars of a third of the side
        t = max(3, round(side * rng.uniform(0.25, 0.38)))
        a = (side - t) // 2
        draw.rectangle([a, 0, a + t - 1, h - 1], fill=1)
        draw.rectangle([0, a, w - 1, a + t - 1], fill=1)
    return np.asarray(layer, dtype=bool)


def _mark_mask(rng: np.random.Generator, name: str, side: int) -> np.ndarray:
    """The masks of the ``marks`` set: a diamond (a square on its corner, squashed up to 1:1.5), a frame
    (a square outline a sixth to a quarter of the side thick) or a five-pointed star."""
    w = h = side
    if name == "diamond":
        short = max(MIN_SIDE // 2, round(side * rng.uniform(0.67, 1.0)))
        w, h = (side, short) if rng.random() < 0.5 else (short, side)
    layer = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    if name == "diamond":
        draw.polygon([(w / 2 - 0.5, 0), (w - 1, h / 2 - 0.5), (w / 2 - 0.5, h - 1), (0, h / 2 - 0.5)], fill=1)
    elif name == "frame":
        t = max(2, round(side * rng.uniform(1 / 6, 1 / 4)))
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
        draw.rectangle([t, t, w - 1 - t, h - 1 - t], fill=0)
    else:
        c, inner = (side - 1) / 2, rng.uniform(0.38, 0.5)
        turn = rng.uniform(0, 2 * math.pi / 5)
        radii = [c * (1.0 if k % 2 == 0 else inner) for k in range(10)]
        angles = [turn + k * math.pi / 5 for k in range(10)]
        points = [(c + r * math.sin(a), c - r * math.cos(a)) for r, a in zip(radii, angles, strict=True)]
        draw.polygon(points, fill=1)
    mask = np.asarray(layer, dtype=bool)
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _place(
    rng: np.random.Generator, mask: np.ndarray, instances: np.ndarray, boxes: list[list[int]]
) -> tuple[int, int] | None:
    """A top-left ``(y, x)`` where ``mask`` hides no earlier object too much, or None after a few tries."""
    size = instances.shape[0]
    h, w = mask.shape
    visible = np.bincount(instances.ravel(), minlength=len(boxes) + 1)
    for _ in range(_PLACEMENT_TRIES):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        box = [x, y, x + w - 1, y + h - 1]
        if any(_overlap(box, other) > MAX_BOX_OVERLAP for other in boxes):
            continue
        covered = np.bincount(instances[y : y + h, x : x + w][mask], minlength=len(boxes) + 1)
        if all(visible[k] - covered[k] >= MIN_VISIBLE * visible[k] for k in range(1, len(boxes) + 1)):
            return y, x
    return None


def _overlap(a: list[int], b: list[int]) -> float:
    """Intersection over the smaller area of two inclusive pixel boxes ``[x0, y0, x1, y1]``."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return iw * ih / smaller


def _colour(rng: np.random.Generator, hue: float) -> np.ndarray:
    """An RGB colour (float32, 0-255) of the class's family: hue ±0.04, saturation and brightness jittered."""
    h = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return np.array([r, g, b], np.float32) * 255


def _pairs(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())
