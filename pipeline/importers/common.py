"""What the importers share: the COCO dict they build, class lists, image sizes, the skipped entries.

An importer turns another label format into a COCO detection dict (``images``, ``annotations``,
``categories``), which ``pipeline.coco.parse_coco`` then validates like any COCO file. Every line or file
it cannot use is kept as a skipped entry ``{"file", "line", "reason"}`` (``line`` 0: the whole file), listed
in the manifest; one bad file never stops the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Imported:
    """A COCO dict whose ``file_name``s are relative to ``images_dir``, and what was skipped on the way."""

    format: str
    data: dict[str, Any]
    images_dir: Path
    skipped: list[dict[str, Any]] = field(default_factory=list)


class CocoBuilder:
    """Builds the COCO dict: categories by name (in ``names`` order when given, else added as found and
    sorted by name at the end), images numbered from 1 in the order added, boxes in pixels (x1, y1, x2, y2)."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.fixed = names is not None
        self.names: list[str] = list(names or [])
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def known(self, name: str) -> bool:
        return not self.fixed or name in self.names

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        return image_id

    def add_box(self, image_id: int, name: str, box: tuple[float, float, float, float], crowd: bool = False) -> None:
        if name not in self.names:
            self.names.append(name)
        x1, y1, x2, y2 = box
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category": name,
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": int(crowd)})  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        names = self.names if self.fixed else sorted(self.names)
        ids = {name: i + 1 for i, name in enumerate(names)}
        annotations = [{**{k: v for k, v in a.items() if k != "category"}, "category_id": ids[a["category"]],
                        "area": a["bbox"][2] * a["bbox"][3]} for a in self.annotations]  # fmt: skip
        categories = [{"id": ids[n], "name": n} for n in names]
        return {"images": self.images, "annotations": annotations, "categories": categories}


def skip(skipped: list[dict[str, Any]], file: Path | str, line: int, reason: str) -> None:
    skipped.append({"file": str(file), "line": line, "reason": reason})


def read_names(path: Path) -> list[str]:
    """One class name per line (blank lines ignored); ``ValueError`` for a missing file or a repeated name."""
    if not path.is_file():
        raise ValueError(f"class list {path} does not exist (--classes: one class name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path}: class names listed twice: {', '.join(repeated)}")
    if not names:
        raise ValueError(f"{path} lists no class names")
    return names


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header; ``ValueError`` if it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path} cannot be read ({e})") from None


def number(text: str | None) -> float:
    """A finite float from label text; ``ValueError`` naming the text otherwise."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {text!r}")
    return value
