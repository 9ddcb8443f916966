"""YOLO: ``images/`` and ``labels/`` trees (``images/train/a.jpg`` with ``labels/train/a.txt``), one
``cls cx cy w h`` line per box, normalised to the image's width and height. Class names come from
``data.yaml`` (``names:`` a list or an ``{index: name}`` dict) or ``classes.txt``; ``--split train`` reads
the folder that ``data.yaml``'s ``train:`` entry names (relative to its ``path:``, or to the file's folder).
An image without a label file, or with an empty one, has no objects.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.importers.common import IMAGE_SUFFIXES, CocoBuilder, Imported, image_size, number, read_names, skip


def load(root: Path, split: str | None = None, names: list[str] | None = None) -> Imported:
    config = _data_yaml(root)
    class_names = names or _names(root, config)
    images = _images_folder(root, config, split)
    builder, skipped = CocoBuilder(class_names), []
    files = sorted(Path(d) / f for d, _, names_ in os.walk(images, followlinks=True) for f in names_
                   if Path(f).suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
    if not files:
        raise ValueError(f"no images in {images}")
    for path in files:
        try:
            width, height = image_size(path)
        except ValueError as e:
            skip(skipped, path, 0, str(e))
            continue
        image_id = builder.add_image(str(path.relative_to(images)), width, height)
        label = _label_file(path)
        if label.is_file():
            _read_labels(label, image_id, (width, height), class_names, builder, skipped)
    return Imported("yolo", builder.to_dict(), images, skipped)


def _data_yaml(root: Path) -> dict:
    path = next((p for p in (root / "data.yaml", root / "dataset.yaml") if p.is_file()), None)
    if path is None:
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must be a mapping with names: and train:/val: entries")
    return {**config, "_file": path}


def _names(root: Path, config: dict) -> list[str]:
    names = config.get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names, key=int)]
    if isinstance(names, list):
        return [str(n) for n in names]
    if (root / "classes.txt").is_file():
        return read_names(root / "classes.txt")
    raise ValueError(f"no class names for {root}: add data.yaml with names:, or classes.txt, or pass --classes")


def _images_folder(root: Path, config: dict, split: str | None) -> Path:
    if split is None:
        return root / "images" if (root / "images").is_dir() else root
    entry = config.get(split)
    if entry is None:
        candidate = root / "images" / split
        if candidate.is_dir():
            return candidate
        raise ValueError(f"--split {split}: no {split}: entry in data.yaml and no {candidate}")
    base = Path(config.get("path") or config["_file"].parent)
    if not base.is_absolute():
        base = config["_file"].parent / base
    return (base / str(entry)).resolve()


def _label_file(image: Path) -> Path:
    """``.../images/SPLIT/a.jpg`` -> ``.../labels/SPLIT/a.txt`` (the last ``images`` folder in the path)."""
    parts = list(image.with_suffix(".txt").parts)
    where = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if where is None:
        return image.with_suffix(".txt")
    parts[where] = "labels"
    return Path(*parts)


def _read_labels(path: Path, image_id: int, size: tuple[int, int], names: list[str], builder, skipped) -> None:
    width, height = size
    for number_, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5:
                raise ValueError(f"expected 'cls cx cy w h', got {len(fields)} fields")
            cls = int(fields[0]) if fields[0].isdigit() else -1
            if not 0 <= cls < len(names):
                raise ValueError(f"class {fields[0]!r} is not an index into the {len(names)} class names")
            cx, cy, w, h = (number(f) for f in fields[1:])
        except ValueError as e:
            skip(skipped, path, number_, str(e))
            continue
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        builder.add_box(image_id, names[cls], box)
