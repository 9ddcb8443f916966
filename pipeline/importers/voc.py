"""Pascal VOC: one XML file per image (``<filename>``, ``<size>``, ``<object>`` with ``<name>``,
``<difficult>`` and ``<bndbox>`` xmin/ymin/xmax/ymax), either the devkit layout (``Annotations/``,
``JPEGImages/``, ``ImageSets/Main/SPLIT.txt``) or a folder of XML files beside their images.

VOC boxes are 1-based inclusive pixel indices: ``x1 = xmin - 1``, ``x2 = xmax`` (likewise y).
``difficult=1`` becomes a crowd box, which COCO evaluation ignores as VOC's does and training leaves out.
"""

from __future__ import annotations

import xml.parsers.expat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.importers.common import CocoBuilder, Imported, image_size, number, skip


@dataclass
class Node:
    tag: str
    line: int
    text: str = ""
    children: list[Node] = field(default_factory=list)

    def find(self, tag: str) -> Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def value(self, tag: str) -> str | None:
        node = self.find(tag)
        return node.text.strip() if node is not None else None


def parse_xml(data: bytes) -> Node:
    """The element tree with each element's line number; ``ValueError`` (with the line) if malformed."""
    parser = xml.parsers.expat.ParserCreate()
    stack = [Node("", 0)]

    def start(tag: str, _attrs) -> None:
        node = Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def text(chunk: str) -> None:
        stack[-1].text += chunk

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise ValueError(f"line {e.lineno}: not well-formed XML ({xml.parsers.expat.ErrorString(e.code)})") from None
    if not stack[0].children:
        raise ValueError("line 0: empty XML")
    return stack[0].children[0]


def load(root: Path, split: str | None = None, names: list[str] | None = None) -> Imported:
    """Reads a VOC folder (see the module doc); ``split`` picks ``ImageSets/Main/SPLIT.txt`` in a devkit."""
    devkit = (root / "Annotations").is_dir()
    xml_dir = root / "Annotations" if devkit else root
    images_dir = root / "JPEGImages" if devkit else root
    if split is not None:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise ValueError(f"--split {split}: {listing} does not exist (VOC devkit layout)")
        files = [xml_dir / f"{line.split()[0]}.xml" for line in listing.read_text().splitlines() if line.strip()]
    else:
        files = sorted(xml_dir.glob("*.xml"))
    if not files:
        raise ValueError(f"no VOC XML files in {xml_dir}")
    builder, skipped = CocoBuilder(names), []
    for path in files:
        _one_file(path, images_dir, builder, skipped)
    return Imported("voc", builder.to_dict(), images_dir, skipped)


def _one_file(path: Path, images_dir: Path, builder: CocoBuilder, skipped: list) -> None:
    try:
        tree = parse_xml(path.read_bytes())
        file_name = tree.value("filename") or ""
        if not file_name:
            raise ValueError(f"line {tree.line}: no <filename>")
        size = tree.find("size")
        width, height = (int(number(size.value("width"))), int(number(size.value("height")))) if size else (0, 0)
        if width <= 0 or height <= 0:  # some exports leave <size> out or at 0: read the image
            width, height = image_size(images_dir / file_name)
    except (OSError, ValueError) as e:
        line, _, reason = str(e).partition(": ") if str(e).startswith("line ") else ("line 0", "", str(e))
        skip(skipped, path, int(line.split()[1]), reason)
        return
    image_id = builder.add_image(file_name, width, height)
    for obj in (c for c in tree.children if c.tag == "object"):
        try:
            name, box = _object(obj)
        except ValueError as e:
            skip(skipped, path, obj.line, f"object skipped: {e}")
            continue
        if not builder.known(name):
            skip(skipped, path, obj.line, f"object skipped: class {name!r} is not in --classes")
            continue
        builder.add_box(image_id, name, box, crowd=obj.value("difficult") == "1")


def _object(obj: Node) -> tuple[str, tuple[float, float, float, float]]:
    name = obj.value("name")
    box = obj.find("bndbox")
    if not name:
        raise ValueError("no <name>")
    if box is None:
        raise ValueError("no <bndbox>")
    xmin, ymin, xmax, ymax = (number(box.value(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
    return name, (xmin - 1, ymin - 1, xmax, ymax)
