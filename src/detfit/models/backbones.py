"""Situation B backbones: an ImageNet classifier's convolutional trunk, as one feature map (the
tutorial's way) or with an FPN over its stage ends.

Feature names, strides and channels come from a dummy forward through the trunk, never from
hand-kept tables; trainable stages and FrozenBatchNorm follow torchvision's rules for pretrained
backbones (``_resnet_fpn_extractor`` for ResNets, ``_mobilenet_extractor`` for the others).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.poolers import initLevelMapper

from detfit.errors import DetfitError
from detfit.models.structure import freeze_batchnorm
from detfit.models.weights import ensure_cached, load_state_dict_file, resolve_weights

BACKBONES = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "efficientnet_b0",
)
RESNET_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
PROBE_SIZE = 256  # dummy-forward side: divisible by every stride, small enough to be quick


@dataclass(frozen=True)
class Block:
    """One child of a trunk, as a dummy forward sees it."""

    name: str
    stride: int
    channels: int


def backbone_enum(name: str) -> type[WeightsEnum]:
    return get_model_weights(name)


def load_classifier(name: str, weights_backbone: Any) -> nn.Module:
    """torchvision's ImageNet classifier ``name``, weights from the cache, a file, or none."""
    spec = resolve_weights(weights_backbone, backbone_enum(name))
    if isinstance(spec, WeightsEnum):
        ensure_cached(spec)
        return get_model(name, weights=spec)
    model = get_model(name, weights=None)
    if isinstance(spec, Path):
        try:
            model.load_state_dict(load_state_dict_file(spec))
        except RuntimeError as exc:
            if isinstance(exc, DetfitError):
                raise
            first = str(exc).strip().splitlines()[0]
            raise DetfitError(f"{spec}: does not fit {name} ({first})") from None
    return model


def trunk_of(classifier: nn.Module) -> nn.Sequential:
    """The convolutional part: ResNet's named layers (torchvision's names) or ``.features``."""
    if hasattr(classifier, "layer4"):
        return nn.Sequential(OrderedDict((n, getattr(classifier, n)) for n in RESNET_LAYERS))
    return classifier.features


def probe(trunk: nn.Sequential) -> list[Block]:
    """Stride and channels after each child of ``trunk``, from a dummy forward."""
    x = torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)
    blocks = []
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        for name, child in trunk.named_children():
            x = child(x)
            blocks.append(Block(name, PROBE_SIZE // x.shape[-1], x.shape[1]))
    trunk.train(was_training)
    return blocks


def stage_ends(blocks: list[Block]) -> list[Block]:
    """The last block at each stride, finest first."""
    ends: dict[int, Block] = {}
    for block in blocks:
        ends[block.stride] = block
    return [ends[s] for s in sorted(ends)]


def freeze_stages(
    trunk: nn.Sequential, blocks: list[Block], trainable: int | None, pretrained: bool
) -> None:
    """Train only the last ``trainable`` stages (default 3 when pretrained, all otherwise).

    ResNets count conv1, layer1..layer4 (bn1 trains only with all 5), as torchvision's
    ``_resnet_fpn_extractor``; other trunks count the first block, each block that lowers the
    resolution and the last block, as ``_mobilenet_extractor`` does with its ``_is_cn`` blocks.
    """
    names = [b.name for b in blocks]
    if names == list(RESNET_LAYERS):
        stages = ["layer4", "layer3", "layer2", "layer1", "conv1"]
    else:
        starts = [0] + [i for i in range(1, len(blocks)) if blocks[i].stride > blocks[i - 1].stride]
        stages = [*starts, len(blocks) - 1]
    count = len(stages)
    if trainable is None:
        trainable = 3 if pretrained else count
    if not 0 <= trainable <= count:
        raise DetfitError(f"trainable_backbone_layers must be in [0, {count}], got {trainable}")
    if names == list(RESNET_LAYERS):
        train = stages[:trainable] + (["bn1"] if trainable == count else [])
        for name, param in trunk.named_parameters():
            param.requires_grad_(name.startswith(tuple(train)))
        return
    freeze_before = len(blocks) if trainable == 0 else stages[count - trainable]
    for block in list(trunk.children())[:freeze_before]:
        block.requires_grad_(False)


def fixed_scale_pooler(
    names: list[str], output_size: int, strides: list[int]
) -> MultiScaleRoIAlign:
    """A MultiScaleRoIAlign whose level scales are the known strides.

    Left alone, torchvision infers them from the first batch, rounding feature/image size ratios;
    padding makes that guess wrong for small images, and then a rebuilt model differs.
    """
    pooler = MultiScaleRoIAlign(featmap_names=names, output_size=output_size, sampling_ratio=2)
    pooler.scales = [1.0 / s for s in strides]
    pooler.map_levels = initLevelMapper(
        int(math.log2(strides[0])),
        int(math.log2(strides[-1])),
        canonical_scale=pooler.canonical_scale,
        canonical_level=pooler.canonical_level,
    )
    return pooler


@dataclass
class Backbone:
    """A detector backbone and what its heads must match."""

    module: nn.Module  # has out_channels; returns a Tensor (one map) or an OrderedDict
    names: list[str]  # feature names the RoI poolers read (extra FPN levels excluded)
    strides: list[int]  # the stride of every output, extra levels included


def build_backbone(
    name: str,
    weights_backbone: Any,
    *,
    fpn: bool,
    extra: str = "pool",
    trainable_layers: int | None = None,
    num_levels: int = 3,
    fpn_channels: int = 256,
) -> Backbone:
    """``name``'s trunk as one map (the tutorial's way: ordinary BatchNorm, every layer trained unless
    ``trainable_layers`` says otherwise) or with an FPN over the ends of its last ``num_levels``
    stages (pretrained: FrozenBatchNorm, 3 trainable stages by default).

    ``extra``: the FPN's extra levels: ``pool`` (R-CNN's max-pool level) or ``p6p7`` (RetinaNet,
    FCOS).
    """
    if name not in BACKBONES:
        raise DetfitError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    pretrained = resolve_weights(weights_backbone, backbone_enum(name)) is not None
    trunk = trunk_of(load_classifier(name, weights_backbone))
    blocks = probe(trunk)
    if not fpn:
        if trainable_layers is not None:
            freeze_stages(trunk, blocks, trainable_layers, pretrained)
        trunk.out_channels = blocks[-1].channels
        return Backbone(trunk, ["0"], [blocks[-1].stride])

    if pretrained:
        freeze_batchnorm(trunk)
    freeze_stages(trunk, blocks, trainable_layers, pretrained)
    ends = stage_ends(blocks)
    if not 1 <= num_levels <= len(ends):
        raise DetfitError(f"num_levels must be in [1, {len(ends)}], got {num_levels}")
    levels = ends[-num_levels:]
    blocks_extra: ExtraFPNBlock = (
        LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(fpn_channels, fpn_channels)
    )
    module = BackboneWithFPN(
        trunk,
        return_layers={b.name: str(k) for k, b in enumerate(levels)},
        in_channels_list=[b.channels for b in levels],
        out_channels=fpn_channels,
        extra_blocks=blocks_extra,
    )
    strides = [b.stride for b in levels]
    extra_strides = [strides[-1] * 2] if extra == "pool" else [strides[-1] * 2, strides[-1] * 4]
    return Backbone(module, [str(k) for k in range(num_levels)], strides + extra_strides)
