"""Ways to run a model faster that keep its function: FrozenBatchNorm folded into the convolution
before it, the channels_last memory format, and RoIAlign as a sparse matrix product
(``models.roi_align``), measured in BENCHMARKS.md.

None changes a state dict's keys, the recorded structure (``models.structure``) or which
parameters train, so checkpoints rebuild as the plain torchvision model (predict, export) and a
run may be resumed with any of them switched on or off. Results differ from the plain model's only by
floating-point rounding (tests/test_speedups.py states the tolerances).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from detfit.config import MemoryFormat
from detfit.models.roi_align import use_sparse_roi_align


class FoldedAway(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose work the convolution before it does (see FoldedConv2d).

    It keeps its buffers, so the state dict and the recorded structure stay the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FoldedConv2d(nn.Conv2d):
    """A Conv2d followed by a frozen BatchNorm, run as one convolution.

    The norm's per-channel scale and shift are folded into the weight and bias at every call:
    that touches the weights only, not the activations, and the gradient reaches ``weight``
    through the same chain rule as before. Saved: the norm's two elementwise passes over the
    output in forward and one in backward, which are large at the backbone's fine strides.
    """

    norm_ref: tuple[FoldedAway]  # a tuple, so the norm is not registered a second time

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.norm_ref[0]
        # FrozenBatchNorm2d's own formula for its scale and shift
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        weight = self.weight * scale.reshape(-1, 1, 1, 1).to(self.weight.dtype)
        bias = shift if self.bias is None else self.bias * scale + shift
        return weight, bias.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        if self.padding_mode != "zeros":
            pad = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(pad, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _conv_norm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of (Conv2d, FrozenBatchNorm2d) children of ``module`` where the norm takes the
    convolution's output and nothing else does: neighbours in a container that runs its
    children in order, or torchvision's ResNet blocks' ``convN``/``bnN``."""
    children = dict(module.named_children())

    def fits(conv: str, norm: str) -> bool:
        return type(children.get(conv)) is nn.Conv2d and type(children.get(norm)) is (
            FrozenBatchNorm2d
        )

    if isinstance(module, nn.Sequential | IntermediateLayerGetter):
        names = list(children)
        returned = getattr(module, "return_layers", {})  # a convolution's own output is a feature
        pairs = zip(names, names[1:], strict=False)
        return [(a, b) for a, b in pairs if fits(a, b) and a not in returned]
    if isinstance(module, BasicBlock | Bottleneck):
        return [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if fits(f"conv{i}", f"bn{i}")]
    return []


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d into the Conv2d that feeds it (see FoldedConv2d), in place.

    Trainable BatchNorm (and a norm after anything but a plain convolution) is left alone.
    Parameters and buffers are the same objects afterwards, so an optimizer built before or
    after sees the same tensors. Returns how many pairs were folded.
    """
    count = 0
    for module in list(model.modules()):
        for conv_name, norm_name in _conv_norm_pairs(module):
            conv: nn.Conv2d = getattr(module, conv_name)
            norm: FrozenBatchNorm2d = getattr(module, norm_name)
            away = FoldedAway(norm.weight.numel(), eps=norm.eps)
            for name in ("weight", "bias", "running_mean", "running_var"):
                setattr(away, name, getattr(norm, name))
            conv.__class__ = FoldedConv2d  # same attributes, parameters and hooks; new forward
            conv.norm_ref = (away,)
            setattr(module, norm_name, away)
            count += 1
    return count


def resolve_memory_format(setting: MemoryFormat, device: torch.device) -> torch.memory_format:
    """``auto``: channels_last on the CPU, where oneDNN's convolutions (depthwise ones above all)
    run faster in it (BENCHMARKS.md); contiguous elsewhere, where it was not measured."""
    if setting == "channels_last" or (setting == "auto" and device.type == "cpu"):
        return torch.channels_last
    return torch.contiguous_format


# torch.compile's backend for ``compile``; tests swap in "aot_eager" (the same tracing and
# autograd graph without inductor's C++ build, which takes minutes on a small CPU).
COMPILE_BACKEND = "inductor"


def compile_backbone(model: nn.Module) -> nn.Module:
    """``torch.compile`` the backbone and FPN of ``model`` in place (``nn.Module.compile``: the
    state dict keys stay). Shapes are dynamic: image sizes vary per batch, and a static graph
    would recompile for each. The heads are left eager: their shapes follow the number of RoIs
    and detections, and NMS and RoIAlign break the graph."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        backbone.compile(backend=COMPILE_BACKEND, dynamic=True)
    return model


def speed_up(
    model: nn.Module,
    device: torch.device,
    *,
    fold_frozen_bn: bool,
    memory_format: MemoryFormat,
    sparse_roi_align: bool,
    compile: bool = False,
) -> nn.Module:
    """Apply the chosen speed-ups to ``model`` (already on ``device``), in place."""
    if fold_frozen_bn:
        fold_frozen_batchnorm(model)
    if sparse_roi_align:  # it runs on the CPU only and calls torchvision's kernel elsewhere
        use_sparse_roi_align(model)
    fmt = resolve_memory_format(memory_format, device)
    if fmt is torch.channels_last:
        # 4-D weights; activations follow from the first convolution. The RoI heads stay
        # contiguous: torchvision's keypoint loss views their output (a channels_last one cannot
        # be viewed), and their 14x14 convolutions gained nothing from channels_last.
        for name, child in model.named_children():
            if name != "roi_heads":
                child.to(memory_format=fmt)
    if compile:  # last: it traces the folded, channels_last modules
        compile_backbone(model)
    return model
