"""Record and re-apply what a state dict does not hold: which BatchNorms are frozen and which
parameters are not trained. With it a checkpoint rebuilds its exact model without the original
pretrained file (COCO or ImageNet) being present."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def describe_structure(model: nn.Module) -> dict[str, Any]:
    frozen_bn = {n: m for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    return {
        "frozen_bn": list(frozen_bn),
        # torchvision sets eps=0 for some weights (COCO_V1 Mask/Faster R-CNN v1); not in state dicts
        "frozen_bn_eps": {n: float(m.eps) for n, m in frozen_bn.items()},
        "frozen_params": [n for n, p in model.named_parameters() if not p.requires_grad],
    }


def _frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    if bn.affine:
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
    if bn.track_running_stats:
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen


def _freeze_named(model: nn.Module, names: list[str]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, nn.BatchNorm2d):
            setattr(parent, child, _frozen_copy(module))


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d becomes a FrozenBatchNorm2d with the same statistics and eps (a
    pretrained backbone's own eps, e.g. 1e-3 for EfficientNet, is kept)."""
    _freeze_named(model, [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d])
    return model


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Swap the named BatchNorm2d modules for FrozenBatchNorm2d and freeze the named parameters."""
    _freeze_named(model, structure.get("frozen_bn", []))
    for name, eps in structure.get("frozen_bn_eps", {}).items():
        model.get_submodule(name).eps = eps
    frozen = set(structure.get("frozen_params", []))
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return model
