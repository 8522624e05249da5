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


VISIBILITY_KEY = "_keypoint_visibility"  # a plain tensor: every v2 transform passes it through


def to_tv_tensors(image: Any, target: dict[str, Any] | None):
    """Give plain-tensor images/boxes/masks/keypoints their tv_tensor types, so v2 transforms move
    them. Keypoints [N,K,3] become KeyPoints [N,K,2]; their visibility waits in the target."""
    if isinstance(image, torch.Tensor) and not isinstance(image, tv_tensors.TVTensor):
        image = tv_tensors.Image(image)
    if target is None:
        return image, None
    target = dict(target)
    canvas = tuple(F.get_size(image))
    boxes = target.get("boxes")
    if isinstance(boxes, torch.Tensor) and not isinstance(boxes, tv_tensors.BoundingBoxes):
        target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas)
    masks = target.get("masks")
    if isinstance(masks, torch.Tensor) and not isinstance(masks, tv_tensors.Mask):
        target["masks"] = tv_tensors.Mask(masks)
    keypoints = target.get("keypoints")
    if isinstance(keypoints, torch.Tensor) and not isinstance(keypoints, tv_tensors.TVTensor):
        target[VISIBILITY_KEY] = keypoints[..., 2:]
        target["keypoints"] = tv_tensors.KeyPoints(keypoints[..., :2], canvas_size=canvas)
    return image, target


def restore_keypoints(target: dict[str, Any] | None) -> dict[str, Any] | None:
    """Put the visibility column back on keypoints transformed as tv_tensors.KeyPoints."""
    if target is not None and VISIBILITY_KEY in target:
        visibility = target.pop(VISIBILITY_KEY)
        target["keypoints"] = torch.cat(
            [target["keypoints"].as_subclass(torch.Tensor), visibility], -1
        )
    return target


def keypoint_flip_permutation(names: list[str] | None) -> list[int] | None:
    """Which keypoint takes each one's place in a mirror image: ``left_*`` <-> ``right_*``
    (COCO's naming; also ``l_``/``r_`` and ``*_left``/``*_right``). None when nothing pairs."""
    if not names:
        return None
    swaps = (("left_", "right_"), ("l_", "r_"), ("_left", "_right"), ("_l", "_r"))
    index = {n: i for i, n in enumerate(names)}
    perm = list(range(len(names)))
    for i, name in enumerate(names):
        for a, b in swaps:
            for x, y in ((a, b), (b, a)):
                prefix = x.endswith("_")
                if (name.startswith(x) if prefix else name.endswith(x)) and perm[i] == i:
                    twin = y + name[len(x) :] if prefix else name[: -len(x)] + y
                    if twin in index:
                        perm[i] = index[twin]
    return perm if perm != list(range(len(names))) else None


class RandomHorizontalFlip(v2.Transform):
    """v2's flip, plus the left/right swap a mirror implies for keypoints: after flipping, the
    "left eye" is where the right eye was (torchvision's references do the same for COCO)."""

    def __init__(self, p: float = 0.5, keypoint_perm: list[int] | None = None) -> None:
        super().__init__()
        self.p = p
        self.keypoint_perm = keypoint_perm
        self._flip = v2.RandomHorizontalFlip(p=1.0)

    def forward(self, *inputs: Any) -> Any:
        if torch.rand(1).item() >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        out = self._flip(*inputs)
        if self.keypoint_perm is not None:
            for item in out if isinstance(out, tuple) else (out,):
                if isinstance(item, dict) and "keypoints" in item:
                    kps = item["keypoints"]
                    item["keypoints"] = tv_tensors.wrap(kps[..., self.keypoint_perm, :], like=kps)
                    if VISIBILITY_KEY in item:
                        item[VISIBILITY_KEY] = item[VISIBILITY_KEY][..., self.keypoint_perm, :]
        return out


def train_transforms(
    hflip_prob: float = 0.5, photometric: bool = False, keypoint_names: list[str] | None = None
) -> v2.Compose:
    """Augmentations for training: horizontal flip (the tutorial's), optional colour jitter."""
    steps: list[Any] = [v2.ToImage()]
    if hflip_prob > 0:
        steps.append(RandomHorizontalFlip(hflip_prob, keypoint_flip_permutation(keypoint_names)))
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
