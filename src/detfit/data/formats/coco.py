"""COCO instances JSON: polygons (several parts), RLE (compressed or not), bbox-only and keypoint
annotations; category ids of any values, image ids of any values (0 included)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from detfit.data.records import AnnotatedSet, ImageRecord, Instance, Problem, class_list
from detfit.errors import DetfitError


def read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except OSError as exc:
        raise DetfitError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DetfitError(f"{path}: not valid JSON ({exc})") from None


# Fields read into an Instance; any other field (attributes, ...) is carried in ``extra``.
HANDLED_FIELDS = {
    *("id", "image_id", "category_id", "bbox", "segmentation"),
    *("keypoints", "num_keypoints", "iscrowd", "area"),
}


def _geometry(ann: dict[str, Any]) -> tuple[list[list[float]] | None, dict | None]:
    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg:
        return (seg if isinstance(seg[0], list) else [seg]), None  # flat list: one polygon
    if isinstance(seg, dict) and "counts" in seg:
        return None, seg
    return None, None


def read_coco(path: Path, images_dir: Path | None = None, drop_empty: bool = False) -> AnnotatedSet:
    """Read a COCO instances file; image paths are ``images_dir / file_name``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DetfitError(f"{path}: not a COCO instances file (no 'images' list)")
    images_dir = Path(images_dir) if images_dir else _default_images_dir(path, data["images"])
    problems: list[Problem] = []
    src = str(path)

    categories = sorted(data.get("categories") or [], key=lambda c: c["id"])
    if not categories:
        raise DetfitError(f"{path}: no 'categories'")
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    keypoint_cat = next((c for c in categories if c.get("keypoints")), None)

    records: dict[Any, ImageRecord] = {}
    base = str(images_dir)
    for img in data["images"]:
        image_id = img.get("id")
        if image_id in records:
            problems.append(Problem(src, f"image id {image_id} appears twice", fatal=True))
            continue
        file_name = str(img.get("file_name", ""))
        records[image_id] = ImageRecord(
            file=os.path.join(base, file_name),
            image_id=int(image_id),
            width=img.get("width"),
            height=img.get("height"),
            file_name=file_name,
        )

    for ann in data.get("annotations") or []:
        record = records.get(ann.get("image_id"))
        where = f"{src} (annotation {ann.get('id')})"
        if record is None:
            problems.append(
                Problem(where, f"refers to unknown image id {ann.get('image_id')}", fatal=True)
            )
            continue
        label = label_of.get(ann.get("category_id"))
        if label is None:
            problems.append(
                Problem(where, f"refers to unknown category id {ann.get('category_id')}", True)
            )
            continue
        polygons, rle = _geometry(ann)
        box = None
        if "bbox" in ann and ann["bbox"] is not None:
            x, y, w, h = map(float, ann["bbox"])
            box = (x, y, x + w, y + h)
        record.instances.append(
            Instance(
                label=label,
                box=box,
                polygons=polygons,
                rle=rle,
                keypoints=ann.get("keypoints") or None,
                crowd=bool(ann.get("iscrowd", 0)),
                source_id=ann.get("id"),
                area=ann.get("area"),
                extra={k: v for k, v in ann.items() if k not in HANDLED_FIELDS} or None,
            )
        )

    images = [r for r in records.values() if r.instances or not drop_empty]
    return AnnotatedSet(
        classes=class_list([str(c.get("name", c["id"])) for c in categories]),
        images=images,
        source=src,
        category_ids=[0, *(c["id"] for c in categories)],
        keypoint_names=list(keypoint_cat["keypoints"]) if keypoint_cat else None,
        skeleton=keypoint_cat.get("skeleton") if keypoint_cat else None,
        problems=problems,
    )


def _default_images_dir(path: Path, images: list[dict]) -> Path:
    """The folder the file names are relative to: next to the JSON, or its ``images/`` sibling."""
    first = next((img.get("file_name") for img in images if img.get("file_name")), None)
    for candidate in (path.parent, path.parent / "images", path.parent.parent / "images"):
        if first is None or (candidate / first).exists():
            return candidate
    return path.parent
