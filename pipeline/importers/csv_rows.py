"""CSV in the keras-retinanet convention: ``path,x1,y1,x2,y2,class`` rows (pixels; ``path`` relative to the
CSV's folder; a row with the box fields empty is an image without objects) and a ``class,id`` file."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.importers.common import CocoBuilder, Imported, image_size, number, skip


def load(annotations: Path, classes: Path | None = None, names: list[str] | None = None) -> Imported:
    if names is None:
        classes = classes or annotations.with_name("classes.csv")
        names = read_class_ids(classes)
    builder, skipped = CocoBuilder(names), []
    images: dict[str, int] = {}
    with annotations.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            try:
                _row(row, annotations.parent, images, builder)
            except ValueError as e:
                skip(skipped, annotations, line, str(e))
    if not images:
        raise ValueError(f"{annotations} names no images (rows: path,x1,y1,x2,y2,class)")
    return Imported("csv", builder.to_dict(), annotations.parent, skipped)


def _row(row: list[str], base: Path, images: dict[str, int], builder: CocoBuilder) -> None:
    if len(row) != 6:
        raise ValueError(f"expected 6 fields (path,x1,y1,x2,y2,class), got {len(row)}")
    path, *coords, name = (cell.strip() for cell in row)
    if not path:
        raise ValueError("no image path")
    empty = all(not c for c in coords) and not name
    box = None if empty else tuple(number(c) for c in coords)
    if box is not None and not builder.known(name):
        raise ValueError(f"class {name!r} is not in the class file")
    if path not in images:
        width, height = image_size(base / path)
        images[path] = builder.add_image(path, width, height)
    if box is not None:
        builder.add_box(images[path], name, box)  # type: ignore[arg-type]


def read_class_ids(path: Path) -> list[str]:
    """``class,id`` rows -> the names in ascending id; ``ValueError`` naming the file and line."""
    if not path.is_file():
        raise ValueError(f"class file {path} does not exist (rows: class_name,id); pass --classes")
    by_id: dict[int, str] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 2 or not row[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{path}, line {line}: expected 'class_name,id', got {','.join(row)!r}")
            name, id_ = row[0].strip(), int(row[1])
            if id_ in by_id or name in by_id.values():
                raise ValueError(f"{path}, line {line}: class {name!r} or id {id_} listed twice")
            by_id[id_] = name
    return [by_id[i] for i in sorted(by_id)]
