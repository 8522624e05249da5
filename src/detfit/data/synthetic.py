"""Penn-Fudan-shaped synthetic data (shapes on noise, instance-id masks) for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_pennfudan(
    root: str | Path,
    num_images: int = 6,
    size: tuple[int, int] = (64, 80),
    max_instances: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``root/PennFudanPed/{PNGImages,PedMasks}`` and return that folder.

    Each image is noise with 1..max_instances filled upright rectangles ("pedestrians") of
    distinct colours; the mask PNG holds instance ids 1..n, as the real set does. Heights and
    widths vary a little per image so aspect-ratio grouping has something to group.
    """
    rng = np.random.default_rng(seed)
    out = Path(root) / "PennFudanPed"
    (out / "PNGImages").mkdir(parents=True, exist_ok=True)
    (out / "PedMasks").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        h = size[0] + int(rng.integers(0, size[0] // 4 + 1))
        w = size[1] + int(rng.integers(-(size[1] // 4), size[1] // 4 + 1))
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        for k in range(1, int(rng.integers(1, max_instances + 1)) + 1):
            bh = int(rng.integers(h // 3, h // 3 * 2 + 1))
            bw = int(rng.integers(max(2, w // 8), max(3, w // 4) + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            x0 = int(rng.integers(0, w - bw + 1))
            region = mask[y0 : y0 + bh, x0 : x0 + bw]
            region[region == 0] = k  # earlier instances stay in front
            image[mask == k] = rng.integers(120, 256, 3, dtype=np.uint8)
        name = f"FudanPed{i + 1:05d}"
        Image.fromarray(image).save(out / "PNGImages" / f"{name}.png")
        Image.fromarray(mask).save(out / "PedMasks" / f"{name}_mask.png")
    return out


SYNTHETIC_CLASSES = ("cat", "dog", "bird")
COCO_CATEGORY_IDS = (7, 3, 12)  # deliberately neither contiguous nor sorted by name


def synthetic_objects(num_images: int, size: tuple[int, int], seed: int) -> list[dict]:
    """Per image: height, width and objects (label 1..3, polygon in pixels) side by side,
    never overlapping, so instance-id masks can hold them all."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(num_images):
        h = size[0] + int(rng.integers(0, size[0] // 4 + 1))
        w = size[1] + int(rng.integers(0, size[1] // 4 + 1))
        n = int(rng.integers(1, 4)) if i % 4 != 3 else 0  # every 4th image is a negative
        slot = w / 3
        objects = []
        for k in range(n):
            x0 = k * slot + float(rng.uniform(1, slot * 0.2))
            x1 = (k + 1) * slot - float(rng.uniform(1, slot * 0.2))
            y0 = float(rng.uniform(1, h * 0.3))
            y1 = float(rng.uniform(h * 0.6, h - 1))
            xm = (x0 + x1) / 2
            if rng.random() < 0.5:  # a pentagon (house shape) or a rectangle
                polygon = [x0, y1, x0, (y0 + y1) / 2, xm, y0, x1, (y0 + y1) / 2, x1, y1]
            else:
                polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
            label = int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1))
            objects.append({"label": label, "polygon": [float(round(v)) for v in polygon]})
        images.append({"name": f"img{i:03d}", "height": h, "width": w, "objects": objects})
    return images


def polygon_annotation(obj: dict, ann_id: int, image_id: int) -> dict:
    """The COCO annotation of a generated object: its polygon, its box and the box's area."""
    xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": COCO_CATEGORY_IDS[obj["label"] - 1],
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "area": (x1 - x0) * (y1 - y0),
        "segmentation": [obj["polygon"]],
        "iscrowd": 0,
    }


def write_all_formats(
    root: str | Path, num_images: int = 8, size: tuple[int, int] = (64, 96), seed: int = 0
) -> dict[str, Path]:
    """The same synthetic annotations in every format detfit reads; returns format -> spec path.

    ``coco`` (polygons, ids 7/3/12, image ids from 0), ``voc`` (boxes), ``yolo`` (boxes),
    ``yolo-seg`` (polygons) and ``masks`` (instance-id PNGs plus a class map per mask).
    """
    import json

    import pycocotools.mask as mask_util

    from detfit.data.records import Instance
    from detfit.data.rle import instance_rle

    root = Path(root)
    rng = np.random.default_rng(seed + 1)
    images = synthetic_objects(num_images, size, seed)
    dirs = {
        "coco": root / "coco" / "images",
        "voc": root / "voc" / "JPEGImages",
        "yolo": root / "yolo" / "images" / "train",
        "yolo-seg": root / "yolo-seg" / "images" / "train",
        "masks": root / "masks" / "images",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for d in ("voc/Annotations", "yolo/labels/train", "yolo-seg/labels/train", "masks/masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    coco: dict = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [
        {"id": cid, "name": name} for cid, name in zip(COCO_CATEGORY_IDS, SYNTHETIC_CLASSES)
    ]
    for image_id, img in enumerate(images):
        h, w, name = img["height"], img["width"], img["name"]
        pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        ids = np.zeros((h, w), np.uint8)
        for k, obj in enumerate(img["objects"], 1):
            rle = instance_rle(Instance(obj["label"], polygons=[obj["polygon"]]), h, w)
            mask = mask_util.decode(rle).astype(bool)
            ids[mask] = k
            pixels[mask] = (60 + 60 * obj["label"], 255 - 50 * obj["label"], 40 * k)
        for d in dirs.values():
            Image.fromarray(pixels).save(d / f"{name}.png")
        Image.fromarray(ids).save(root / "masks" / "masks" / f"{name}.png")
        class_map = {
            str(k): SYNTHETIC_CLASSES[o["label"] - 1] for k, o in enumerate(img["objects"], 1)
        }
        (root / "masks" / "masks" / f"{name}.json").write_text(json.dumps(class_map))
        coco["images"].append({"id": image_id, "file_name": f"{name}.png", "width": w, "height": h})
        voc_objects, yolo_lines, seg_lines = [], [], []
        for obj in img["objects"]:
            xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            coco["annotations"].append(
                polygon_annotation(obj, 100 + len(coco["annotations"]), image_id)
            )
            voc_objects.append(
                f"<object><name>{SYNTHETIC_CLASSES[obj['label'] - 1]}</name><difficult>0</difficult>"
                f"<bndbox><xmin>{x1 + 1:g}</xmin><ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax>"
                f"<ymax>{y2:g}</ymax></bndbox></object>"
            )
            cls = obj["label"] - 1
            yolo_lines.append(
                f"{cls} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                f"{(y2 - y1) / h:.6f}"
            )
            coords = " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in zip(xs, ys))
            seg_lines.append(f"{cls} {coords}")
        (root / "voc" / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{''.join(voc_objects)}</annotation>"
        )
        for fmt, lines in (("yolo", yolo_lines), ("yolo-seg", seg_lines)):
            (root / fmt / "labels" / "train" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (root / "coco" / "annotations.json").write_text(json.dumps(coco))
    for fmt in ("yolo", "yolo-seg"):
        (root / fmt / "data.yaml").write_text(
            "path: .\ntrain: images/train\nnames:\n"
            + "".join(f"  {i}: {n}\n" for i, n in enumerate(SYNTHETIC_CLASSES))
        )
    return {
        "coco": root / "coco" / "annotations.json",
        "voc": root / "voc",
        "yolo": root / "yolo" / "data.yaml",
        "yolo-seg": root / "yolo-seg" / "data.yaml",
        "masks": root / "masks",
    }


def scattered_objects(
    height: int,
    width: int,
    count: int,
    object_size: tuple[int, int],
    rng: np.random.Generator,
) -> list[dict]:
    """Up to ``count`` non-overlapping objects (label 1..3, polygon in pixels) of
    ``object_size`` (min, max) pixels a side, anywhere in a ``height`` x ``width`` image: the
    small objects of a large drone, microscope or shelf photo."""
    lo, hi = object_size
    objects: list[dict] = []
    taken: list[tuple[float, float, float, float]] = []
    for _ in range(count * 20):  # rejection sampling; a crowded image keeps fewer
        if len(objects) == count:
            break
        bw, bh = (float(v) for v in rng.integers(lo, hi + 1, 2))
        x0, y0 = float(rng.uniform(1, width - bw - 1)), float(rng.uniform(1, height - bh - 1))
        x1, y1 = x0 + bw, y0 + bh
        if any(x0 < b[2] + 2 and b[0] < x1 + 2 and y0 < b[3] + 2 and b[1] < y1 + 2 for b in taken):
            continue
        taken.append((x0, y0, x1, y1))
        objects.append(
            {
                "label": int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1)),
                "polygon": shape_polygon(x0, y0, x1, y1, bool(rng.random() < 0.5)),
            }
        )
    return objects


def shape_polygon(x0: float, y0: float, x1: float, y1: float, house: bool) -> list[float]:
    """A pentagon (house shape) or a rectangle filling the box, as synthetic_objects draws."""
    xm = (x0 + x1) / 2
    if house:
        polygon = [x0, y1, x0, (y0 + y1) / 2, xm, y0, x1, (y0 + y1) / 2, x1, y1]
    else:
        polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
    return [float(round(v)) for v in polygon]


def render(height: int, width: int, objects: list[dict], rng: np.random.Generator) -> np.ndarray:
    """Noise with each object filled in its class's colour (as write_all_formats paints them)."""
    import pycocotools.mask as mask_util

    from detfit.data.records import Instance
    from detfit.data.rle import instance_rle

    pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    for k, obj in enumerate(objects, 1):
        xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
        bx0, by0 = int(min(xs)), int(min(ys))
        bx1, by1 = int(max(xs)) + 2, int(max(ys)) + 2
        local = [v - (bx0 if i % 2 == 0 else by0) for i, v in enumerate(obj["polygon"])]
        rle = instance_rle(Instance(obj["label"], polygons=[local]), by1 - by0, bx1 - bx0)
        mask = mask_util.decode(rle).astype(bool)
        region = pixels[by0:by1, bx0:bx1][: mask.shape[0], : mask.shape[1]]
        region[mask[: region.shape[0], : region.shape[1]]] = (
            60 + 60 * obj["label"],
            255 - 50 * obj["label"],
            40 * (k % 6),
        )
    return pixels


def write_scattered_coco(
    root: str | Path,
    num_images: int,
    size: tuple[int, int],
    objects_per_image: int,
    object_size: tuple[int, int] = (16, 40),
    seed: int = 0,
) -> Path:
    """``root/images/*.png`` and ``root/annotations.json`` (COCO, the 3 synthetic classes with
    ids 7/3/12): ``size`` (height, width) images with small scattered objects; returns the
    annotations file. Small images train a detector, large ones test sliced inference."""
    import json

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coco: dict = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [
        {"id": cid, "name": name} for cid, name in zip(COCO_CATEGORY_IDS, SYNTHETIC_CLASSES)
    ]
    height, width = size
    for image_id in range(num_images):
        objects = scattered_objects(height, width, objects_per_image, object_size, rng)
        name = f"img{image_id:04d}.png"
        Image.fromarray(render(height, width, objects, rng)).save(root / "images" / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        for obj in objects:
            coco["annotations"].append(
                polygon_annotation(obj, len(coco["annotations"]) + 1, image_id)
            )
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path
