"""Any readable dataset written as a COCO instances file (``detfit data convert``).

Source ids survive: category ids, image ids and annotation ids of a COCO source are kept, so
COCO -> detfit -> COCO keeps every annotation; polygons stay polygons and RLE stays RLE.
Instance-id masks become compressed RLE; VOC ``difficult`` objects become ``iscrowd: 1`` with
``difficult: 1`` kept alongside.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_util

from detfit.data.detection import rasterize
from detfit.data.images import load_mask_ids, read_header
from detfit.data.records import AnnotatedSet
from detfit.data.rle import compressed, encode_masks, instance_rle
from detfit.fileio import atomic_write_text


def _file_name(path: Path, out_dir: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), out_dir.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def to_coco(annotations: AnnotatedSet, out_dir: Path) -> dict[str, Any]:
    """The split as a COCO dict; image paths relative to ``out_dir`` (where the JSON goes)."""
    images, anns = [], []
    next_id = 1 + max(
        (i.source_id for r in annotations.images for i in r.instances if i.source_id is not None),
        default=0,
    )
    for record in annotations.images:
        width, height = record.width, record.height
        if not (width and height):
            header = read_header(record.path)
            width, height = header.width, header.height
        images.append(
            {
                "id": record.image_id,
                "file_name": _file_name(record.path, out_dir),
                "width": int(width),
                "height": int(height),
            }
        )
        ids = load_mask_ids(record.mask_path) if record.mask_path else None
        for inst in record.instances:
            ann: dict[str, Any] = {
                "id": inst.source_id if inst.source_id is not None else next_id,
                "image_id": record.image_id,
                "category_id": annotations.category_id(inst.label),
                "iscrowd": int(inst.crowd),
            }
            next_id += inst.source_id is None
            rle = instance_rle(inst, height, width)
            if inst.polygons is not None or inst.rle is not None:
                ann["segmentation"] = inst.polygons if inst.polygons is not None else inst.rle
            elif inst.mask_value is not None:
                (ann["segmentation"],) = encode_masks(rasterize(inst, height, width, ids)[None])
                rle = compressed(ann["segmentation"])
            if inst.box is not None:
                x1, y1, x2, y2 = inst.box
                ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            elif rle is not None:
                ann["bbox"] = [float(v) for v in mask_util.toBbox(rle)]
            if rle is not None:
                ann["area"] = float(mask_util.area(rle))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3]) if "bbox" in ann else 0.0
            if inst.area is not None:
                ann["area"] = inst.area
            if inst.keypoints is not None:
                ann["keypoints"] = inst.keypoints
                ann["num_keypoints"] = sum(v > 0 for v in inst.keypoints[2::3])
            if inst.extra:
                ann.update(inst.extra)
            anns.append(ann)
    categories = []
    for label, name in enumerate(annotations.classes[1:], 1):
        category: dict[str, Any] = {"id": annotations.category_id(label), "name": name}
        if annotations.keypoint_names:
            category["keypoints"] = annotations.keypoint_names
            category["skeleton"] = annotations.skeleton or []
        categories.append(category)
    return {"images": images, "annotations": anns, "categories": categories}


def write_coco(annotations: AnnotatedSet, out: Path) -> dict[str, Any]:
    """Write the split as COCO JSON at ``out`` (atomically); returns the dict written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = to_coco(annotations, out.parent)
    atomic_write_text(out, json.dumps(data))
    return data
