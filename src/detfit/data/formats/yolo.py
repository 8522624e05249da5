"""YOLO txt labels: ``class cx cy w h`` (detection) or ``class x1 y1 x2 y2 ...`` (segmentation),
all normalised to [0, 1], one file per image under the ``labels/`` twin of its ``images/`` folder,
class names from Ultralytics' ``data.yaml``."""

from __future__ import annotations

import math
from pathlib import Path

from detfit.data.images import list_images, read_header
from detfit.data.records import AnnotatedSet, ImageRecord, Instance, Problem, class_list
from detfit.errors import DetfitError

MAX_CLASSES = 100_000  # without names, class ids become names "0".."N": keep N sane


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder in the path becomes ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def split_images(source: Path | list[Path]) -> list[Path]:
    """Images of a split: a folder (searched recursively), a .txt list of paths, or a list."""
    if isinstance(source, list):
        return [p for s in source for p in split_images(s)]
    source = Path(source)
    if source.is_dir():
        return list_images(source)
    if source.suffix == ".txt" and source.is_file():
        base = source.parent
        try:
            text = source.read_text()
        except (OSError, ValueError) as exc:
            raise DetfitError(f"{source}: cannot read the list of images ({exc})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "\0" not in ln]
        return [p if p.is_absolute() else base / p for p in map(Path, lines)]
    raise DetfitError(f"{source}: not a folder of images nor a .txt list of them")


def parse_label_line(values: list[float], width: int, height: int) -> tuple:
    """(box, polygon) in pixels from one line's coordinates (class id removed)."""
    if len(values) == 4:
        cx, cy, w, h = values
        box = (
            (cx - w / 2) * width,
            (cy - h / 2) * height,
            (cx + w / 2) * width,
            (cy + h / 2) * height,
        )
        return box, None
    xs, ys = values[0::2], values[1::2]
    polygon = [c for x, y in zip(xs, ys) for c in (x * width, y * height)]
    return (min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height), polygon


def read_yolo(
    source: Path | list[Path], names: list[str] | None, drop_empty: bool = False
) -> AnnotatedSet:
    problems: list[Problem] = []
    images: list[ImageRecord] = []
    parsed: list[tuple[Path, list[tuple[int, list[float]]]]] = []
    max_class = -1
    for image_path in split_images(source):
        txt = label_path(image_path)
        rows: list[tuple[int, list[float]]] = []
        try:
            lines = txt.read_text().splitlines() if txt.is_file() else []
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8 text
            problems.append(Problem(str(txt), f"cannot read ({exc})", fatal=True))
            lines = []
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                cls, values = int(fields[0]), [float(v) for v in fields[1:]]
            except ValueError:
                problems.append(Problem(f"{txt}:{n}", "not numbers", fatal=True))
                continue
            if not all(math.isfinite(v) and -1 <= v <= 2 for v in values):
                problems.append(
                    Problem(f"{txt}:{n}", "coordinates are not normalised to [0, 1]", True)
                )
                continue
            if not 0 <= cls < MAX_CLASSES:
                problems.append(
                    Problem(f"{txt}:{n}", f"class id {cls} not in 0..{MAX_CLASSES - 1}", True)
                )
                continue
            if len(values) != 4 and (len(values) < 6 or len(values) % 2):
                problems.append(
                    Problem(f"{txt}:{n}", "expected cx cy w h or a polygon (x y pairs)", True)
                )
                continue
            rows.append((cls, values))
            max_class = max(max_class, cls)
        parsed.append((image_path, rows))
    if names is None:
        names = [str(i) for i in range(max_class + 1)]
    classes = class_list(names)

    for index, (image_path, rows) in enumerate(parsed):
        try:
            header = read_header(image_path)
        except DetfitError as exc:
            problems.append(Problem(str(image_path), str(exc).split(": ", 1)[-1], fatal=True))
            continue
        record = ImageRecord(
            file=str(image_path),
            image_id=index,
            width=header.width,
            height=header.height,
            file_name=image_path.name,
        )
        for cls, values in rows:
            if not 0 <= cls < len(classes) - 1:
                problems.append(
                    Problem(str(label_path(image_path)), f"class id {cls} not in names", True)
                )
                continue
            box, polygon = parse_label_line(values, header.width, header.height)
            record.instances.append(
                Instance(label=cls + 1, box=box, polygons=[polygon] if polygon else None)
            )
        if record.instances or not drop_empty:
            images.append(record)
    source_name = str(source[0] if isinstance(source, list) else source)
    return AnnotatedSet(classes=classes, images=images, source=source_name, problems=problems)
