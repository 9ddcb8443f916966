"""VOC, YOLO and CSV import: coco128 exported to each format by an independent writer (plain string
formatting here, none of the importers' code) and converted back with ``jobs/convert.py`` gives the same
images, the same boxes to the pixel and the same class names; malformed lines and files are listed with
their file and line, and the rest is converted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import importers

ROOT = Path(__file__).resolve().parents[2]

MIN_SIDE = 2.0  # boxes exported: VOC's integer pixels would turn thinner ones into nothing


def convert(args: list[str]) -> subprocess.CompletedProcess:
    """``jobs/convert.py ARGS`` as a user runs it."""
    command = [sys.executable, str(ROOT / "jobs" / "convert.py"), *args, "--no-progress"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _converted(args: list[str]) -> str:
    done = convert(args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _coco128(coco128: Path) -> tuple[list[dict], dict[int, str], Path]:
    data = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {im["id"]: {**im, "boxes": []} for im in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        if w >= MIN_SIDE and h >= MIN_SIDE:
            images[a["image_id"]]["boxes"].append((names[a["category_id"]], x, y, x + w, y + h, a.get("iscrowd", 0)))
    return sorted(images.values(), key=lambda im: im["file_name"]), names, coco128 / "images" / "train2017"


def _link_images(dest: Path, images: list[dict], folder: Path) -> None:
    dest.mkdir(parents=True)
    for im in images:
        (dest / im["file_name"]).symlink_to(folder / im["file_name"])


def _write_voc(root: Path, images: list[dict], folder: Path) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    _link_images(root / "JPEGImages", images, folder)
    for im in images:
        objects = "".join(
            f"<object><name>{n}</name><difficult>{crowd}</difficult><bndbox><xmin>{round(x1) + 1}</xmin>"
            f"<ymin>{round(y1) + 1}</ymin><xmax>{round(x2)}</xmax><ymax>{round(y2)}</ymax></bndbox></object>\n"
            for n, x1, y1, x2, y2, crowd in im["boxes"]
        )
        xml = (f"<annotation>\n<filename>{im['file_name']}</filename>\n<size><width>{im['width']}</width>"
               f"<height>{im['height']}</height><depth>3</depth></size>\n{objects}</annotation>\n")  # fmt: skip
        (root / "Annotations" / f"{Path(im['file_name']).stem}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{Path(im['file_name']).stem}\n" for im in images))
    return root


def _write_yolo(root: Path, images: list[dict], names: dict[int, str], folder: Path) -> Path:
    _link_images(root / "images" / "train", images, folder)
    (root / "labels" / "train").mkdir(parents=True)
    index = {name: i for i, name in enumerate(names[k] for k in sorted(names))}
    lines = "\n".join(f"  {i}: {n}" for n, i in index.items())
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nnames:\n{lines}\n")
    for im in images:
        w, h = im["width"], im["height"]
        rows = [f"{index[n]} {(x1 + x2) / 2 / w:.7f} {(y1 + y2) / 2 / h:.7f} {(x2 - x1) / w:.7f} {(y2 - y1) / h:.7f}"
                for n, x1, y1, x2, y2, crowd in im["boxes"] if not crowd]  # fmt: skip
        if rows:
            (root / "labels" / "train" / f"{Path(im['file_name']).stem}.txt").write_text("\n".join(rows) + "\n")
    return root


def _write_csv(root: Path, images: list[dict], names: dict[int, str], folder: Path) -> Path:
    _link_images(root / "images", images, folder)
    rows = []
    for im in images:
        boxes = [b for b in im["boxes"] if not b[5]]
        rows += [f"images/{im['file_name']},{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f},{n}" for n, x1, y1, x2, y2, _ in boxes]
        if not boxes:
            rows.append(f"images/{im['file_name']},,,,,")
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.csv").write_text("".join(f"{names[k]},{i}\n" for i, k in enumerate(sorted(names))))
    return root / "annotations.csv"


def _read_back(output: Path) -> tuple[dict[str, list[tuple]], dict]:
    gt = json.loads((output / "ground_truth.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    boxes: dict[str, list[tuple]] = {Path(im["file_name"]).name: [] for im in gt["images"]}
    file_of = {im["id"]: Path(im["file_name"]).name for im in gt["images"]}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[file_of[a["image_id"]]].append((names[a["category_id"]], x, y, x + w, y + h, a["iscrowd"]))
    return boxes, json.loads((output / "manifest.json").read_text())


@pytest.mark.parametrize("fmt", ["voc", "yolo", "csv"])
def test_coco128_exported_and_imported_back_is_the_same(fmt: str, coco128: Path, tmp_path: Path) -> None:
    images, names, folder = _coco128(coco128)
    source = {"voc": lambda: _write_voc(tmp_path / "voc", images, folder),
              "yolo": lambda: _write_yolo(tmp_path / "yolo", images, names, folder),
              "csv": lambda: _write_csv(tmp_path / "csv", images, names, folder)}[fmt]()  # fmt: skip
    out = _converted(["--data", str(source), "--output", str(tmp_path / "out")])
    assert f"format: {fmt} (detected)" in out
    got, manifest = _read_back(tmp_path / "out")
    assert manifest["skipped_labels"] == [] and manifest["skipped_images"] == []
    assert sorted(got) == sorted(im["file_name"] for im in images)
    tolerance = 0.5 if fmt == "voc" else 0.01  # VOC stores integer pixels
    for im in images:
        want = sorted(b for b in im["boxes"] if fmt == "voc" or not b[5])  # YOLO and CSV have no crowd boxes
        have = list(got[im["file_name"]])
        assert sorted(b[0] for b in have) == sorted(b[0] for b in want), im["file_name"]
        for b in want:  # each exported box has its own imported box: same class and crowd flag, to the pixel
            same = [a for a in have if a[0] == b[0] and a[5] == b[5]]
            assert same, (im["file_name"], b)
            nearest = min(same, key=lambda a: _distance(a, b))
            assert _distance(nearest, b) <= tolerance, (im["file_name"], nearest, b)
            have.remove(nearest)


def _distance(a: tuple, b: tuple) -> float:
    return max(abs(p - q) for p, q in zip(a[1:5], b[1:5], strict=True))


def test_malformed_lines_are_listed_with_file_and_line_and_the_rest_converts(coco128: Path, tmp_path: Path) -> None:
    images, names, folder = _coco128(coco128)
    images = images[:6]
    yolo = _write_yolo(tmp_path / "yolo", images, names, folder)
    label = sorted((yolo / "labels" / "train").glob("*.txt"))[0]
    good = label.read_text().splitlines()
    label.write_text("\n".join([good[0], "0 0.5 0.5 0.1", "99 0.5 0.5 0.1 0.1", "0 a 0.5 0.1 0.1", *good[1:]]) + "\n")
    _converted(["--data", str(yolo), "--output", str(tmp_path / "out")])
    _, manifest = _read_back(tmp_path / "out")
    assert [(Path(s["file"]).name, s["line"]) for s in manifest["skipped_labels"]] == [
        (label.name, n) for n in (2, 3, 4)
    ]
    assert "expected 'cls cx cy w h'" in manifest["skipped_labels"][0]["reason"]
    assert "not an index into the 80 class names" in manifest["skipped_labels"][1]["reason"]
    assert manifest["num_images"] == 6
    assert manifest["num_boxes"] == sum(1 for im in images for b in im["boxes"] if not b[5])

    voc = _write_voc(tmp_path / "voc", images, folder)
    xmls = sorted((voc / "Annotations").glob("*.xml"))
    xmls[0].write_text("<annotation>\n<filename>x.jpg</filename>\n<size>\n")  # cut short
    text = xmls[1].read_text().replace("<bndbox>", "<box>", 1).replace("</bndbox>", "</box>", 1)
    xmls[1].write_text(text)
    _converted(["--data", str(voc), "--output", str(tmp_path / "voc-out")])
    _, manifest = _read_back(tmp_path / "voc-out")
    skipped = {Path(s["file"]).name: s for s in manifest["skipped_labels"]}
    assert skipped[xmls[0].name]["line"] == 4 and "not well-formed" in skipped[xmls[0].name]["reason"]
    assert skipped[xmls[1].name]["line"] == 4 and "no <bndbox>" in skipped[xmls[1].name]["reason"]
    assert manifest["num_images"] == 5

    csv = _write_csv(tmp_path / "csv", images, names, folder)
    rows = csv.read_text().splitlines()
    boxed = next(r for r in rows if not r.endswith(",,,,,"))
    csv.write_text("\n".join([rows[0], "images/x.jpg,1,2,3", boxed.rsplit(",", 1)[0] + ",unicorn", *rows[1:]]) + "\n")
    _converted(["--data", str(csv), "--output", str(tmp_path / "csv-out")])
    _, manifest = _read_back(tmp_path / "csv-out")
    assert [(s["line"], s["reason"][:20]) for s in manifest["skipped_labels"]] == [
        (2, "expected 6 fields (p"), (3, "class 'unicorn' is n")]  # fmt: skip


def test_format_detection_and_its_errors(tmp_path: Path) -> None:
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text("<annotation/>")
    assert importers.detect(tmp_path / "voc") == "voc"
    (tmp_path / "voc" / "data.yaml").write_text("names: [a]\n")
    with pytest.raises(ValueError, match=r"looks like voc and yolo.*pass --format"):
        importers.detect(tmp_path / "voc")
    with pytest.raises(ValueError, match="none fits"):
        importers.detect(tmp_path)
    refused = convert(["--data", str(tmp_path), "--output", str(tmp_path / "out")])
    assert refused.returncode != 0 and "error: cannot tell the label format" in refused.stderr
    assert "Traceback" not in refused.stderr
