"""Label formats other than COCO json, read into the COCO dict that ``pipeline.coco`` validates: Pascal VOC
(``voc``), YOLO txt (``yolo``) and keras-retinanet CSV (``csv``). ``detect`` names the format of a path
when only one fits; ``load`` reads it."""

from __future__ import annotations

from pathlib import Path

from pipeline.importers.common import Imported, read_names

FORMATS = ("coco", "voc", "yolo", "csv")


def detect(source: Path) -> str:
    """The format of ``source`` (a file or folder); ``ValueError`` listing the candidates when none or several
    fit, so that the user passes ``--format``."""
    if source.is_file():
        by_suffix = {".json": "coco", ".csv": "csv"}
        if source.suffix.lower() in by_suffix:
            return by_suffix[source.suffix.lower()]
        raise ValueError(f"cannot tell the format of {source} from its name: pass --format {'|'.join(FORMATS)}")
    if not source.is_dir():
        raise ValueError(f"{source} does not exist")
    found = []
    if (source / "Annotations").is_dir() or any(source.glob("*.xml")):
        found.append("voc")
    if (source / "labels").is_dir() or (source / "data.yaml").is_file() or (source / "dataset.yaml").is_file():
        found.append("yolo")
    if any(source.glob("annotations*.json")) or (source / "annotations").is_dir():
        found.append("coco")
    if len(found) != 1:
        what = f"it looks like {' and '.join(found)}" if found else "none fits"
        raise ValueError(f"cannot tell the label format of {source} ({what}): pass --format {'|'.join(FORMATS[1:])}")
    return found[0]


def load(fmt: str, source: Path, split: str | None = None, classes: Path | None = None) -> Imported:
    """Reads ``source`` in format ``fmt`` (``voc``, ``yolo`` or ``csv``); ``classes``: a names file that
    fixes the class order (for CSV: the ``class,id`` file unless it is one name per line)."""
    from pipeline.importers import csv_rows, voc, yolo

    if fmt == "csv":
        names = read_names(classes) if classes is not None and "," not in classes.read_text() else None
        return csv_rows.load(source, classes if names is None else None, names)
    names = read_names(classes) if classes is not None else None
    if fmt == "voc":
        return voc.load(source, split, names)
    if fmt == "yolo":
        return yolo.load(source, split, names)
    raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "Imported", "detect", "load"]
