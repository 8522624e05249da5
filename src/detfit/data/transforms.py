"""Training and evaluation presets built from torchvision.transforms.v2.

Boxes and masks are tv_tensors, so every geometric transform moves them with the image.
``augment: basic`` leaves scale jitter to the model's own resize (``min_size`` as a tuple), which
is free; ``ssj``/``lsj`` rescale each image by a random factor and crop or pad it to a fixed
square canvas, as Detectron2's ``ResizeScale`` + ``FixedSizeCrop`` and torchvision's references
(``--data-augmentation lsj``) do.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

# Per-object entries SanitizeBoundingBoxes must drop with their box; it drops masks itself but
# not keypoints (nor their visibility, kept apart while transforms run).
PER_INSTANCE_KEYS = ("labels", "area", "iscrowd", "keypoints", "_keypoint_visibility")


def per_instance_tensors(sample: Any) -> tuple[torch.Tensor, ...] | None:
    """labels_getter for SanitizeBoundingBoxes: drop labels, area, iscrowd and keypoints with
    their box (a crop can leave a box empty; a flip or a resize never does)."""
    target = sample[1] if isinstance(sample, (tuple, list)) and len(sample) > 1 else sample
    if not isinstance(target, dict):
        return None
    return tuple(target[k] for k in PER_INSTANCE_KEYS if k in target) or None


VISIBILITY_KEY = PER_INSTANCE_KEYS[-1]  # a plain tensor: every v2 transform passes it through


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


# Scale factor ranges: "standard" and "large" scale jitter (Ghiasi et al., Simple Copy-Paste,
# CVPR 2021; Detectron2's new baselines and torchvision's v2.ScaleJitter use the large one).
SCALE_RANGES: dict[str, tuple[float, float]] = {"ssj": (0.8, 1.25), "lsj": (0.1, 2.0)}
# The padding of a canvas larger than the rescaled image: ImageNet's mean colour, which the
# model's normalisation turns into zeros (torchvision's references pad LSJ canvases so too).
PAD_FILL = (124, 116, 104)


def mask_extents(masks: torch.Tensor) -> torch.Tensor:
    """Float [N, 4] XYXY box around each mask's pixels, edges on pixel edges (x2 = last + 1, as
    detfit's targets and COCO count them); all zeros for an empty mask. (torchvision.ops'
    masks_to_boxes puts x2 on the last pixel and has no answer for an empty mask.)"""
    if not len(masks):
        return torch.zeros((0, 4), dtype=torch.float32)
    hits = masks.bool()
    rows, cols = hits.any(2), hits.any(1)  # [N, H], [N, W]

    def span(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(hits.shape[1], dtype=torch.float32)
        first = torch.where(hits, index, float("inf")).amin(1)
        last = torch.where(hits, index, -1.0).amax(1) + 1
        empty = ~hits.any(1)
        return first.masked_fill(empty, 0.0), last.masked_fill(empty, 0.0)

    x1, x2 = span(cols)
    y1, y2 = span(rows)
    return torch.stack([x1, y1, x2, y2], 1)


def _target_of(inputs: tuple) -> dict[str, Any] | None:
    return next((item for item in inputs if isinstance(item, dict)), None)


class BoxesFromMasks(v2.Transform):
    """Each box becomes its mask's extent again, after a crop cut the mask (Detectron2 recomputes
    boxes from masks when it crops): a clamped box would still frame the pixels the crop removed.
    An empty mask gives an empty box, which SanitizeBoundingBoxes then drops. ``area`` becomes
    the rescaled mask's pixel count."""

    def forward(self, *inputs: Any) -> Any:
        target = _target_of(inputs)
        if target is not None and "masks" in target and "boxes" in target:
            boxes, masks = target["boxes"], target["masks"]
            target["boxes"] = tv_tensors.wrap(mask_extents(masks).to(boxes), like=boxes)
            if "area" in target:
                target["area"] = masks.flatten(1).sum(1).to(target["area"].dtype)
        return inputs if len(inputs) > 1 else inputs[0]


class HideOutsideKeypoints(v2.Transform):
    """Keypoints a crop left outside the canvas become invisible (visibility 0), so Keypoint
    R-CNN does not learn points it cannot see; v2 moves keypoints but keeps them all."""

    def forward(self, *inputs: Any) -> Any:
        target = _target_of(inputs)
        if target is not None and VISIBILITY_KEY in target:
            kps = target["keypoints"]
            height, width = kps.canvas_size
            x, y = kps[..., 0], kps[..., 1]
            outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
            target[VISIBILITY_KEY] = target[VISIBILITY_KEY].masked_fill(outside[..., None], 0)
        return inputs if len(inputs) > 1 else inputs[0]


def scale_jitter_steps(augment: str, canvas: int) -> list[v2.Transform]:
    """Rescale so the image fits ``canvas`` x ``canvas`` times a random factor from the policy's
    range (v2.ScaleJitter, as Detectron2's ResizeScale), then a random ``canvas``-square crop,
    padded where the image is smaller (Detectron2's FixedSizeCrop)."""
    low, high = SCALE_RANGES[augment]
    fill: dict[Any, Any] = {tv_tensors.Image: PAD_FILL, "others": 0}
    return [
        v2.ScaleJitter((canvas, canvas), scale_range=(low, high)),
        v2.RandomCrop((canvas, canvas), pad_if_needed=True, fill=fill),
        BoxesFromMasks(),
        HideOutsideKeypoints(),
    ]


def train_transforms(
    hflip_prob: float = 0.5,
    photometric: bool = False,
    keypoint_names: list[str] | None = None,
    augment: str = "basic",
    canvas: int = 800,
) -> v2.Compose:
    """Augmentations for training: horizontal flip (the tutorial's), optional colour jitter;
    with ``augment`` ``ssj`` or ``lsj`` also a random rescale and crop/pad to a ``canvas``-pixel
    square (:func:`scale_jitter_steps`). ``basic`` draws exactly what detfit always drew."""
    steps: list[Any] = [v2.ToImage()]
    if hflip_prob > 0:
        steps.append(RandomHorizontalFlip(hflip_prob, keypoint_flip_permutation(keypoint_names)))
    if augment != "basic":
        steps += scale_jitter_steps(augment, canvas)
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
