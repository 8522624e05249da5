"""Training and evaluation presets built from torchvision.transforms.v2.

Boxes and masks are tv_tensors, so every geometric transform moves them with the image.
Scale jitter is left to the model's own resize (``min_size`` as a tuple), which is free.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

PER_INSTANCE_KEYS = ("labels", "area", "iscrowd")


def per_instance_tensors(sample: Any) -> tuple[torch.Tensor, ...] | None:
    """labels_getter for SanitizeBoundingBoxes: drop labels, area and iscrowd with their box."""
    target = sample[1] if isinstance(sample, (tuple, list)) and len(sample) > 1 else sample
    if not isinstance(target, dict):
        return None
    return tuple(target[k] for k in PER_INSTANCE_KEYS if k in target) or None


def to_tv_tensors(image: Any, target: dict[str, Any] | None):
    """Give plain-tensor images/boxes/masks/keypoints their tv_tensor types, so v2 transforms move
    them; keypoints [N,K,3] lose their visibility column for the call (returned separately)."""
    if isinstance(image, torch.Tensor) and not isinstance(image, tv_tensors.TVTensor):
        image = tv_tensors.Image(image)
    if target is None:
        return image, None, None
    target = dict(target)
    canvas = tuple(F.get_size(image))
    boxes = target.get("boxes")
    if isinstance(boxes, torch.Tensor) and not isinstance(boxes, tv_tensors.BoundingBoxes):
        target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
    masks = target.get("masks")
    if isinstance(masks, torch.Tensor) and not isinstance(masks, tv_tensors.Mask):
        target["masks"] = tv_tensors.Mask(masks)
    visibility = None
    keypoints = target.get("keypoints")
    if isinstance(keypoints, torch.Tensor) and not isinstance(keypoints, tv_tensors.TVTensor):
        visibility = keypoints[..., 2:]
        target["keypoints"] = tv_tensors.KeyPoints(keypoints[..., :2], canvas_size=canvas)
    return image, target, visibility


def restore_keypoints(target: dict[str, Any] | None, visibility: torch.Tensor | None):
    """Put the visibility column back on keypoints transformed as tv_tensors.KeyPoints."""
    if target is not None and visibility is not None:
        target["keypoints"] = torch.cat(
            [target["keypoints"].as_subclass(torch.Tensor), visibility], -1
        )
    return target


def train_transforms(hflip_prob: float = 0.5, photometric: bool = False) -> v2.Compose:
    """Augmentations for training: horizontal flip (the tutorial's), optional colour jitter."""
    steps: list[Any] = [v2.ToImage()]
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    if photometric:
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(labels_getter=per_instance_tensors),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation: convert to a float image in [0, 1]; the model resizes and normalises."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])
