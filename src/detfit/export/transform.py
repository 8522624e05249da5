"""The detectors' resize, computed the way eager torch computes it, in every export path.

Eager torchvision sizes the resized image as floor(side * scale) with a float64 scale; its
scripted code rounds the scale through float32 first and its traced (ONNX) code multiplies in
float32. Either lands one pixel short at many common sizes (e.g. 375x500 at min_size 64: eager
64 rows, scripted 63), which moves every box. This transform computes the size in float64 in
all three modes, so the exported model sees the eager model's pixels.
"""

import copy
import math
from typing import Dict, Optional, Tuple  # noqa: UP035 (TorchScript reads these)

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class ExactResizeTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform for inference whose resize matches eager torch's sizes."""

    def resize(
        self,
        image: Tensor,
        target: Optional[Dict[str, Tensor]] = None,  # noqa: UP006, UP045
    ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:  # noqa: UP006, UP045
        if self.fixed_size is not None:
            size = [self.fixed_size[1], self.fixed_size[0]]
            return nn.functional.interpolate(
                image[None], size=size, mode="bilinear", align_corners=False
            )[0], target
        min_size = float(self.min_size[-1])
        max_size = float(self.max_size)
        if torchvision._is_tracing():
            return self._traced_resize(image, min_size, max_size), target
        height, width = image.shape[-2], image.shape[-1]
        scale = min(min_size / float(min(height, width)), max_size / float(max(height, width)))
        size = [int(math.floor(float(height) * scale)), int(math.floor(float(width) * scale))]
        return nn.functional.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False
        )[0], target

    @torch.jit.unused
    def _traced_resize(self, image: Tensor, min_size: float, max_size: float) -> Tensor:
        """ONNX: the same float64 arithmetic on the traced shape, so H and W stay dynamic."""
        shape = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        # tensor / tensor: the exporter would compute a Python float / tensor in float32
        limits = torch.tensor([min_size, max_size], dtype=torch.float64)
        scale = (limits / torch.stack([shape.min(), shape.max()])).min()
        out = torch.floor(shape * scale).to(torch.int64)
        size = [out[0], out[1]]
        return nn.functional.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False
        )[0]


def for_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose transform resizes as eager torch does."""
    model = copy.deepcopy(model).eval()
    old = model.transform
    new = ExactResizeTransform(
        old.min_size,
        old.max_size,
        old.image_mean,
        old.image_std,
        old.size_divisible,
        old.fixed_size,
    )
    model.transform = new.eval()
    return model
