"""Pascal VOC XML: one file per image under ``Annotations/``, images under ``JPEGImages/``.

VOC pixel indices are 1-based and inclusive, so ``xmin..xmax`` covers the continuous interval
``[xmin - 1, xmax]``. ``difficult`` objects are ignored in evaluation (as crowd regions) and
never trained on, as in the VOC protocol.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from detfit.data.records import AnnotatedSet, ImageRecord, Instance, Problem, class_list
from detfit.errors import DetfitError


def voc_root_and_ids(path: Path) -> tuple[Path, list[str] | None]:
    """A VOC root folder (every XML in it), or an ``ImageSets/Main/<split>.txt`` list of ids."""
    path = Path(path)
    if path.is_file() and path.suffix == ".txt":
        root = path.parents[2] if path.parent.name == "Main" else path.parent
        try:
            lines = path.read_text().splitlines()
        except (OSError, ValueError) as exc:
            raise DetfitError(f"{path}: cannot read the list of ids ({exc})") from None
        return root, [line.split()[0] for line in lines if line.strip()]
    if (path / "Annotations").is_dir():
        return path, None
    raise DetfitError(f"{path}: not a VOC folder (no Annotations/) nor an ImageSets .txt list")


def _text(node: ET.Element, tag: str, default: str | None = None) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text else default


def _number(text: str | None) -> float | None:
    """A finite number from an XML field, or None."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _size(node: ET.Element | None, tag: str) -> int | None:
    """An image size from ``<size>`` (None when absent or not a positive number: from the header)."""
    value = _number(_text(node, tag)) if node is not None else None
    return int(value) if value is not None and 1 <= value < 2**31 else None


def read_voc(path: Path, names: list[str] | None = None, drop_empty: bool = False) -> AnnotatedSet:
    root, ids = voc_root_and_ids(path)
    xml_files = (
        [root / "Annotations" / f"{i}.xml" for i in ids]
        if ids is not None
        else sorted((root / "Annotations").glob("*.xml"))
    )
    problems: list[Problem] = []
    parsed = []
    for xml_path in xml_files:
        try:
            parsed.append((xml_path, ET.parse(xml_path).getroot()))
        except (OSError, ET.ParseError, ValueError, RecursionError) as exc:
            problems.append(Problem(str(xml_path), f"cannot read ({exc})", fatal=True))
    if names is None:
        names = sorted({_text(o, "name", "") for _, x in parsed for o in x.iter("object")} - {""})
    classes = class_list(names)
    label_of = {n: i for i, n in enumerate(classes) if i}

    images = []
    for index, (xml_path, xml) in enumerate(parsed):
        file_name = _text(xml, "filename") or f"{xml_path.stem}.jpg"
        image_path = root / "JPEGImages" / file_name
        if not image_path.exists() and (root / "JPEGImages" / f"{xml_path.stem}.jpg").exists():
            image_path = root / "JPEGImages" / f"{xml_path.stem}.jpg"
        size = xml.find("size")
        record = ImageRecord(
            file=str(image_path),
            image_id=index,
            width=_size(size, "width"),
            height=_size(size, "height"),
            file_name=file_name,
        )
        for obj in xml.iter("object"):
            name = _text(obj, "name", "")
            if name not in label_of:
                problems.append(Problem(str(xml_path), f"unknown class {name!r}", fatal=True))
                continue
            bnd = obj.find("bndbox")
            corners = [
                _number(_text(bnd, k)) if bnd is not None else None
                for k in ("xmin", "ymin", "xmax", "ymax")
            ]
            if any(c is None for c in corners):
                problems.append(
                    Problem(str(xml_path), f"object {name!r} has no valid bndbox", True)
                )
                continue
            xmin, ymin, xmax, ymax = corners
            difficult = _text(obj, "difficult", "0") == "1"
            record.instances.append(
                Instance(
                    label=label_of[name],
                    box=(xmin - 1, ymin - 1, xmax, ymax),
                    crowd=difficult,
                    extra={"difficult": 1} if difficult else None,
                )
            )
        if record.instances or not drop_empty:
            images.append(record)
    return AnnotatedSet(classes=classes, images=images, source=str(path), problems=problems)
