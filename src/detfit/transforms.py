"""The references' ``transforms`` module names, working on the tutorial's plain-tensor targets.

``from detfit import transforms as T`` then ``T.Compose([T.PILToTensor(), T.ToDtype(torch.float,
scale=True), T.RandomHorizontalFlip(0.5)])``. Each transform wraps its transforms.v2 twin: plain
``boxes``/``masks``/``keypoints`` are given tv_tensor types for the call, so they follow every
geometric change; PIL or tensor images, and ``image_id`` as an int or a tensor [1], all work.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from detfit.data.transforms import per_instance_tensors, restore_keypoints, to_tv_tensors


class _V2Adapter:
    """Apply one transforms.v2 transform to ``(image, target)`` with plain-tensor targets."""

    v2_class: type[v2.Transform]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.transform = self.v2_class(*args, **kwargs)

    def __call__(self, image: Any, target: dict[str, Any] | None = None):
        image, wrapped = to_tv_tensors(image, target)
        if wrapped is None:
            return self.transform(image), None
        image, wrapped = self.transform(image, wrapped)
        return image, restore_keypoints(wrapped)

    def __repr__(self) -> str:
        return f"T.{type(self).__name__}({self.transform!r})"


def _adapter(name: str, v2_class: type[v2.Transform]) -> type[_V2Adapter]:
    return type(name, (_V2Adapter,), {"v2_class": v2_class, "__doc__": v2_class.__doc__})


class Compose:
    """Apply transforms in order to ``(image, target)``."""

    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, image: Any, target: dict[str, Any] | None = None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


PILToTensor = _adapter("PILToTensor", v2.PILToTensor)
ToImage = _adapter("ToImage", v2.ToImage)
ToDtype = _adapter("ToDtype", v2.ToDtype)
RandomHorizontalFlip = _adapter("RandomHorizontalFlip", v2.RandomHorizontalFlip)
RandomPhotometricDistort = _adapter("RandomPhotometricDistort", v2.RandomPhotometricDistort)
RandomZoomOut = _adapter("RandomZoomOut", v2.RandomZoomOut)
RandomIoUCrop = _adapter("RandomIoUCrop", v2.RandomIoUCrop)
ScaleJitter = _adapter("ScaleJitter", v2.ScaleJitter)
RandomShortestSize = _adapter("RandomShortestSize", v2.RandomShortestSize)
ToPureTensor = _adapter("ToPureTensor", v2.ToPureTensor)


class ConvertImageDtype(ToDtype):
    """The references' ConvertImageDtype(dtype): scales integer images to [0, 1] floats."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype, scale=True)


class SanitizeBoundingBoxes(_V2Adapter):
    """Drop degenerate boxes with their labels, area, iscrowd and masks."""

    v2_class = v2.SanitizeBoundingBoxes

    def __init__(self, min_size: float = 1.0) -> None:
        super().__init__(min_size=min_size, labels_getter=per_instance_tensors)


__all__ = [
    "Compose",
    "ConvertImageDtype",
    "PILToTensor",
    "RandomHorizontalFlip",
    "RandomIoUCrop",
    "RandomPhotometricDistort",
    "RandomShortestSize",
    "RandomZoomOut",
    "SanitizeBoundingBoxes",
    "ScaleJitter",
    "ToDtype",
    "ToImage",
    "ToPureTensor",
]
