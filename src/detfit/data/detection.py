"""The dataset contract for any annotation format: ``(image, target)`` as the tutorial defines it.

``target``: ``boxes`` (float32 [N,4] XYXY), ``labels`` (int64, 1..K), ``image_id`` (int64 [1], the
source's id), ``area`` (the file's own where it has one, as pycocotools reads it; else the mask's
pixel count, or the box's area without masks), ``iscrowd`` (uint8) and, when the set has them,
``masks`` (uint8 [N,H,W]) and ``keypoints`` (float32 [N,K,3]). Training targets leave
crowd/difficult regions out; evaluation targets keep them with ``iscrowd=1`` so COCO evaluation
ignores detections on them.
Repairs happen here, silently (the up-front check has already said so): boxes are clipped to the
image and boxes with no area after clipping are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torchvision import tv_tensors

from detfit.data.images import load_mask_ids, load_rgb
from detfit.data.records import AnnotatedSet, ImageRecord, Instance
from detfit.data.rle import instance_rle
from detfit.data.transforms import restore_keypoints, to_tv_tensors

MIN_BOX_SIZE = 1.0  # pixels; as SanitizeBoundingBoxes' default, so transforms drop nothing more


def rasterize(instance: Instance, height: int, width: int, ids: torch.Tensor | None) -> np.ndarray:
    """The instance's mask as uint8 [H, W] from its polygons, RLE or id in the mask PNG."""
    if instance.mask_value is not None and ids is not None:
        return (ids == instance.mask_value).numpy().astype(np.uint8)
    rle = instance_rle(instance, height, width)
    if rle is None:
        return np.zeros((height, width), np.uint8)
    mask = mask_util.decode(rle)
    if mask.shape != (height, width):  # reported by the check; keep shapes consistent
        out = np.zeros((height, width), np.uint8)
        h, w = min(height, mask.shape[0]), min(width, mask.shape[1])
        out[:h, :w] = mask[:h, :w]
        mask = out
    return mask


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Box around ``mask``'s pixels in COCO's convention: edges on pixel edges, so x2 = last + 1."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1


def build_target(
    record: ImageRecord,
    height: int,
    width: int,
    *,
    with_masks: bool,
    num_keypoints: int = 0,
    include_crowd: bool = False,
) -> dict[str, Any]:
    """Target tensors for ``record`` on an image of ``height`` x ``width``."""
    ids = load_mask_ids(record.mask_path) if with_masks and record.mask_path else None
    boxes, labels, crowd, masks, keypoints, given_areas = [], [], [], [], [], []
    for inst in record.instances:
        if inst.crowd and not include_crowd:
            continue
        mask = rasterize(inst, height, width, ids) if with_masks else None
        box = inst.box or (mask_box(mask) if mask is not None else None)
        if box is None:
            continue
        x1, y1 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
        x2, y2 = min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
        if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
            continue  # degenerate (or entirely outside the image): never reaches the model
        boxes.append((x1, y1, x2, y2))
        labels.append(inst.label)
        crowd.append(int(inst.crowd))
        given_areas.append(inst.area)
        if with_masks:
            masks.append(mask)
        if num_keypoints:
            kps = inst.keypoints or [0.0] * (3 * num_keypoints)
            keypoints.append(kps[: 3 * num_keypoints])
    box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target: dict[str, Any] = {
        "boxes": tv_tensors.BoundingBoxes(box_tensor, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": torch.tensor([record.image_id], dtype=torch.int64),
        "iscrowd": torch.tensor(crowd, dtype=torch.uint8),
    }
    if with_masks:
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
        target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        target["area"] = target["masks"].flatten(1).sum(1).to(torch.float32)
    else:
        target["area"] = (box_tensor[:, 2] - box_tensor[:, 0]) * (
            box_tensor[:, 3] - box_tensor[:, 1]
        )
    for k, area in enumerate(given_areas):  # the file's own area (COCO) is what APs/m/l use
        if area is not None:
            target["area"][k] = float(area)
    if num_keypoints:
        target["keypoints"] = torch.tensor(keypoints, dtype=torch.float32).reshape(
            -1, num_keypoints, 3
        )
    return target


class DetectionDataset(torch.utils.data.Dataset):
    """Any :class:`AnnotatedSet` behind the tutorial's dataset contract.

    ``train=True`` drops crowd/difficult regions from the targets (they are not objects to learn);
    ``train=False`` keeps them as ignore regions for COCO evaluation.
    """

    def __init__(
        self,
        annotations: AnnotatedSet,
        transforms: Callable | None = None,
        *,
        train: bool = False,
        with_masks: bool | None = None,
    ) -> None:
        self.annotations = annotations
        self.records = annotations.images
        self.classes = annotations.classes
        self.transforms = transforms
        self.train = train
        self.with_masks = annotations.has_masks if with_masks is None else with_masks
        self.num_keypoints = len(annotations.keypoint_names or [])

    def __len__(self) -> int:
        return len(self.records)

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        """From the annotation file (or the image header): no pixels decoded."""
        record = self.records[idx]
        if record.width and record.height:
            return int(record.height), int(record.width)
        from detfit.data.images import read_header

        header = read_header(record.path)
        return header.height, header.width

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        record = self.records[idx]
        image = load_rgb(record.path, max_pixels=None)  # checked (max_pixels) before training
        height, width = image.shape[-2:]
        target = build_target(
            record,
            height,
            width,
            with_masks=self.with_masks,
            num_keypoints=self.num_keypoints,
            include_crowd=not self.train,
        )
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = to_tv_tensors(image, target)
            image, target = self.transforms(image, target)
            target = restore_keypoints(target)
        return image, target
