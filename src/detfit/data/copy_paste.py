"""Simple Copy-Paste (Ghiasi et al., CVPR 2021): objects of another training image, with their
masks, pasted onto this one.

It works on whole training items (image and target already augmented), so it sits between the
training split and :class:`~detfit.data.sampling.PerItemSeed`: the coin, the partner image, the
subset of its objects and the partner's own augmentation are all drawn from the item's seed
(seed, epoch, index), which keeps a run independent of loader processes and ranks, and a
mid-epoch resume exact. torchvision's references paste within a batch instead (their
``SimpleCopyPaste``), which ties an image's augmentation to its batch-mates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from detfit.data.batching import image_size
from detfit.data.detection import MIN_BOX_SIZE
from detfit.data.transforms import mask_extents

# Per-object entries of a target, besides boxes and masks, that follow their object.
PER_OBJECT = ("labels", "area", "iscrowd", "keypoints")


class CopyPaste(Dataset):
    """``dataset`` (a training split with masks) whose item ``i``, with probability ``p``, gets a
    random non-empty subset of another item's objects pasted on top.

    The objects underneath lose the pixels the pasted masks cover; their boxes become the extent
    of what is left and their covered keypoints invisible; objects left with no pixels (or a box
    under :data:`~detfit.data.detection.MIN_BOX_SIZE`) are dropped. A partner of another size is
    resized to this image's size first (as torchvision's references do; with ``augment`` ssj or
    lsj every training image has the same canvas already).
    """

    def __init__(self, dataset: Dataset, p: float) -> None:
        self.dataset = dataset
        self.p = p

    def __len__(self) -> int:
        return len(self.dataset)

    def get_height_and_width(self, index: int) -> tuple[int, int]:
        return image_size(self.dataset, index)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        paste = len(self) > 1 and torch.rand(()).item() < self.p
        partner = int(torch.randint(len(self) - 1, ())) if paste else 0
        image, target = self.dataset[index]
        if not paste:
            return image, target
        partner += partner >= index  # any item but this one
        source_image, source = self.dataset[partner]
        return paste_objects(image, target, source_image, source)


def paste_objects(
    image: torch.Tensor,
    target: dict[str, Any],
    source_image: torch.Tensor,
    source: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``image`` with a random non-empty subset of ``source``'s objects pasted on it (plain
    tensors: a dataset item after its transforms), and the target that goes with it."""
    count = len(source["boxes"])
    if count == 0:
        return image, target
    chosen = torch.rand(count) < 0.5
    if not chosen.any():
        chosen[torch.randint(count, ())] = True
    source = {k: v[chosen] for k, v in source.items() if k in ("boxes", "masks", *PER_OBJECT)}
    height, width = image.shape[-2:]
    if tuple(source_image.shape[-2:]) != (height, width):
        source_image, source = _resized(source_image, source, height, width)
        big = _big_enough(source["boxes"])  # a small object may vanish when shrunk
        source = {k: v[big] for k, v in source.items()}
    cover = source["masks"].bool().any(0)  # [H, W]
    image = torch.where(cover, source_image.to(image.dtype), image)

    below = dict(target)
    masks = below["masks"] * ~cover
    changed = masks.flatten(1).sum(1) != below["masks"].flatten(1).sum(1)
    boxes = below["boxes"].clone()
    boxes[changed] = mask_extents(masks[changed]).to(boxes.dtype)
    below["masks"], below["boxes"] = masks, boxes
    if "area" in below:
        below["area"] = torch.where(
            changed, masks.flatten(1).sum(1).to(below["area"]), below["area"]
        )
    if "keypoints" in below and len(below["keypoints"]):
        kps = below["keypoints"].clone()
        x = kps[..., 0].long().clamp(0, width - 1)
        y = kps[..., 1].long().clamp(0, height - 1)
        kps[..., 2] = kps[..., 2].masked_fill(cover[y, x], 0)
        below["keypoints"] = kps
    keep = _big_enough(boxes)
    out = dict(target)
    for key in ("boxes", "masks", *PER_OBJECT):
        if key in target:
            out[key] = torch.cat([below[key][keep], source[key].to(below[key].dtype)])
    return image, out


def _big_enough(boxes: torch.Tensor) -> torch.Tensor:
    return ((boxes[:, 2:] - boxes[:, :2]) >= MIN_BOX_SIZE).all(1)


def _resized(
    image: torch.Tensor, target: dict[str, Any], height: int, width: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``image`` and its objects stretched to ``height`` x ``width``; boxes from the resized
    masks, so they stay the masks' extents."""
    scale_y, scale_x = height / image.shape[-2], width / image.shape[-1]
    image = F.resize(image, [height, width], antialias=True)
    out = dict(target)
    out["masks"] = F.resize(
        target["masks"], [height, width], interpolation=F.InterpolationMode.NEAREST
    )
    out["boxes"] = mask_extents(out["masks"]).to(target["boxes"].dtype)
    if "area" in out:
        out["area"] = out["masks"].flatten(1).sum(1).to(target["area"].dtype)
    if "keypoints" in out:
        kps = target["keypoints"].clone()
        kps[..., 0] *= scale_x
        kps[..., 1] *= scale_y
        out["keypoints"] = kps
    return image, out
