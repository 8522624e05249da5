"""RoIAlign as a sparse matrix product: torchvision's function, several times faster on the CPU.

torchvision's CPU kernel for RoIAlign's backward pass runs on one thread and recomputes every
bilinear weight for every channel; on the CPU recipe it took ~10% of a training iteration
(BENCHMARKS.md). Here the pooling is written as what it is, a linear map: each output
bin is a weighted sum of at most ``(2 * sampling_ratio) ** 2`` feature pixels, the same weights
for every channel. Those weights form a sparse matrix ``S`` (rows: RoI bins, columns: pixels);
the forward pass is ``S @ features`` and the backward pass, which autograd derives, is
``S.T @ grad``: one sparse-dense product each, over channels-last features.

The sample positions, the border rules and the weights follow torchvision's kernel term by term,
so results equal ``torchvision.ops.roi_align`` up to floating-point rounding (the summation order
differs; tests/test_roi_align.py states the tolerances). bfloat16 or float16 features (under
autocast, ``models.precision``) are pooled in float32: the weights are fractions of a pixel, and
the result feeds float32-sensitive heads. Cases this does not cover (an adaptive sampling grid, a
device other than the CPU, tracing for export) call torchvision.
"""

from __future__ import annotations

import warnings

import torch
import torchvision
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales


def _axis_samples(
    start: Tensor, extent: Tensor, pooled: int, grid: int, size: int
) -> tuple[Tensor, Tensor]:
    """Along one axis, for each RoI, bin and sample: the two neighbouring pixel indices and their
    interpolation weights, each ``(K, pooled, grid, 2)``, with torchvision's border rules: a sample
    more than one pixel outside the map weighs nothing, one just outside reads the edge pixel."""
    bin_size = extent / pooled
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)
    offsets = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    pos = (
        start[:, None, None]
        + bins[None, :, None] * bin_size[:, None, None]
        + offsets[None, None, :] * (bin_size / grid)[:, None, None]
    )
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.long()
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low)
    return torch.stack([low, high], -1), torch.stack([(1 - frac) * inside, frac * inside], -1)


def roi_align_matrix(
    rois: Tensor,
    feature_shape: torch.Size,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The sparse CSR matrix ``(K * PH * PW, B * H * W)`` that maps channels-last features to
    RoIAlign's bins (row ``k * PH * PW + i * PW + j`` is RoI k's bin (i, j)). Each row holds the
    bin's distinct pixels in ascending order, as CSR requires; repeated pixels are summed."""
    batch, _, height, width = feature_shape
    pooled_h, pooled_w = output_size
    grid = sampling_ratio
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # torchvision's legacy rule: a RoI is at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    ys, wy = _axis_samples(y1, roi_h, pooled_h, grid, height)
    xs, wx = _axis_samples(x1, roi_w, pooled_w, grid, width)

    # (K, PH, PW, grid, 2, grid, 2): every (y sample, corner) x (x sample, corner) of each bin
    image = rois[:, 0].long()[:, None, None, None, None, None, None]
    pixel = (image * height + ys[:, :, None, :, :, None, None]) * width
    pixel = pixel + xs[:, None, :, None, None, :, :]
    weight = wy[:, :, None, :, :, None, None] * wx[:, None, :, None, None, :, :]
    rows = rois.shape[0] * pooled_h * pooled_w
    pixel, order = pixel.reshape(rows, -1).sort(dim=1)
    weight = weight.reshape(rows, -1).gather(1, order)

    first = torch.ones_like(pixel, dtype=torch.bool)  # the first entry of each run of one pixel
    first[:, 1:] = pixel[:, 1:] != pixel[:, :-1]
    run = first.reshape(-1).cumsum(0) - 1
    values = weight.new_zeros(int(run[-1]) + 1).index_add_(0, run, weight.reshape(-1))
    crow = pixel.new_zeros(rows + 1)
    crow[1:] = first.sum(1).cumsum(0)
    with warnings.catch_warnings():  # torch calls sparse CSR "beta" once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow,
            pixel.reshape(-1)[first.reshape(-1)],
            values / (grid * grid),
            (rows, batch * height * width),
            check_invariants=False,  # built sorted and distinct above
        )


def _covered(features: Tensor, sampling_ratio: int) -> bool:
    return (
        sampling_ratio > 0
        and features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and not torch.jit.is_scripting()
        and not torchvision._is_tracing()
    )


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` (``rois`` as ``(K, 5)`` with the image index first), computed
    as a sparse matrix product where that is covered, torchvision's kernel otherwise."""
    if not _covered(features, sampling_ratio) or rois.shape[0] == 0:
        return torchvision_roi_align(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )
    batch, channels, height, width = features.shape
    dtype = torch.promote_types(features.dtype, torch.float32)  # low precision pools in float32
    matrix = roi_align_matrix(
        rois.to(dtype), features.shape, output_size, spatial_scale, sampling_ratio, aligned
    )
    pixels = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels).to(dtype)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the sparse product down
        bins = matrix @ pixels  # autograd's backward: matrix.T @ grad, also sparse
    # contiguous, as torchvision returns it: the heads after it view their inputs
    return bins.view(rois.shape[0], *output_size, channels).permute(0, 3, 1, 2).contiguous()


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same attributes, levels and result) pooling each level
    with the sparse ``roi_align`` above. ``speed_up`` swaps a built model's poolers to it."""

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]  # torchvision's order
        if not _covered(features[0], self.sampling_ratio):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        pool = {"output_size": self.output_size, "sampling_ratio": self.sampling_ratio}
        if len(features) == 1:
            return roi_align(features[0], rois, spatial_scale=self.scales[0], **pool)
        levels = self.map_levels(boxes)
        dtype = torch.promote_types(features[0].dtype, torch.float32)
        shape = (len(rois), features[0].shape[1], *self.output_size)
        result = features[0].new_zeros(shape, dtype=dtype)
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            chosen = torch.where(levels == level)[0]
            if len(chosen):  # an empty level adds nothing (torchvision's kernel still copies it)
                result[chosen] = roi_align(feature, rois[chosen], spatial_scale=scale, **pool)
        return result


def use_sparse_roi_align(model: torch.nn.Module) -> int:
    """Swap every MultiScaleRoIAlign in ``model`` to SparseMultiScaleRoIAlign, in place (no state,
    so nothing else changes). Returns how many were swapped."""
    poolers = [m for m in model.modules() if type(m) is MultiScaleRoIAlign]
    for pooler in poolers:
        pooler.__class__ = SparseMultiScaleRoIAlign
    return len(poolers)
