"""COCO's run-length encoding, in one place: an annotation's polygons or RLE to a compressed RLE,
and binary masks to JSON-ready RLEs (what evaluation, export and prediction write)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

from detfit.data.records import Instance


def clamp_polygons(polygons: list[list[float]], height: int, width: int) -> list[list[float]]:
    """Polygons with points kept within one image size of the image: pycocotools converts
    coordinates to C ints unchecked, so a point at 1e300 would exhaust memory or crash. The data
    check reports such points as errors; this only guards the rasteriser."""
    out = []
    for polygon in polygons:
        xs = np.clip(np.asarray(polygon[0::2], np.float64), -width, 2 * width)
        ys = np.clip(np.asarray(polygon[1::2], np.float64), -height, 2 * height)
        out.append(np.stack([xs, ys], 1).reshape(-1).tolist())
    return out


def instance_rle(instance: Instance, height: int, width: int) -> dict[str, Any] | None:
    """The compressed RLE (bytes counts, as pycocotools' C code wants) of an instance's polygons
    (parts merged) or of its RLE (compressed or not); None when it has neither. A polygon with
    fewer than 3 points covers nothing."""
    if instance.polygons is not None:
        polygons = [p for p in instance.polygons if len(p) >= 6]
        if not polygons:
            return mask_util.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_util.merge(
            mask_util.frPyObjects(clamp_polygons(polygons, height, width), height, width)
        )
    return compressed(instance.rle) if instance.rle is not None else None


def compressed(rle: dict[str, Any]) -> dict[str, Any]:
    """Any COCO RLE (uncompressed list counts, or compressed counts as str or bytes) in the form
    pycocotools' C functions take: compressed, bytes counts."""
    if isinstance(rle["counts"], list):
        return mask_util.frPyObjects(rle, *rle["size"])
    if isinstance(rle["counts"], str):
        return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return rle


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N,H,W] (or [N,1,H,W]) as compressed RLEs with str counts (JSON-ready)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if masks.ndim == 4:
        masks = masks[:, 0]
    rles = mask_util.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
