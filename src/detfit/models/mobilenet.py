"""Situation B: detectors on an ImageNet MobileNetV2 backbone.

``fasterrcnn_mobilenet_v2`` is the seed's code as written (one 1280-channel map). The FPN variant
derives its feature levels, anchor sizes and RoI pooler from the backbone's actual feature maps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import initLevelMapper

from detfit.models.weights import (
    NO_WEIGHTS,
    ensure_cached,
    load_state_dict_file,
    resolve_weights,
)

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def load_mobilenet_v2(weights_backbone: Any, norm_layer: type[nn.Module]) -> nn.Module:
    """torchvision's mobilenet_v2, with ImageNet weights from the cache, a file, or none."""
    spec = resolve_weights(weights_backbone, MobileNet_V2_Weights)
    if spec is None or isinstance(spec, Path):
        model = mobilenet_v2(weights=None, norm_layer=norm_layer)
        if spec is not None:
            model.load_state_dict(load_state_dict_file(spec))
        return model
    ensure_cached(spec)
    return mobilenet_v2(weights=spec, norm_layer=norm_layer)


def fasterrcnn_mobilenet_v2(
    num_classes: int, *, weights_backbone: Any = "IMAGENET1K_V1", **options: Any
) -> FasterRCNN:
    """The seed's situation B, unchanged: MobileNetV2 ``.features`` as a single 1280-channel map."""
    backbone = load_mobilenet_v2(weights_backbone, nn.BatchNorm2d).features
    backbone.out_channels = 1280
    anchor_generator = AnchorGenerator(
        sizes=((32, 64, 128, 256, 512),), aspect_ratios=(ASPECT_RATIOS,)
    )
    roi_pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=roi_pooler,
        **options,
    )


def stage_ends(features: nn.Sequential) -> list[tuple[int, int, int]]:
    """(block index, stride, channels) of the last block at each stride, from a dummy forward."""
    size = 224
    x = torch.zeros(1, 3, size, size)
    ends: dict[int, tuple[int, int, int]] = {}
    with torch.no_grad():
        for i, block in enumerate(features):
            x = block(x)
            stride = size // x.shape[-1]
            ends[stride] = (i, stride, x.shape[1])
    return sorted(ends.values(), key=lambda e: e[1])


def mobilenet_v2_fpn_backbone(
    weights_backbone: Any = "IMAGENET1K_V1",
    *,
    trainable_layers: int | None = None,
    num_levels: int = 3,
    fpn_channels: int = 256,
) -> tuple[BackboneWithFPN, list[int]]:
    """MobileNetV2 + FPN over the ends of its last ``num_levels`` stages (strides 8, 16, 32).

    Pretrained backbones get FrozenBatchNorm and train only the last ``trainable_layers`` stages
    (torchvision's rule, default 3); an untrained one trains everything with BatchNorm.
    Returns the backbone and the strides of its outputs (the max-pool level included).
    """
    pretrained = weights_backbone not in NO_WEIGHTS
    features = load_mobilenet_v2(
        weights_backbone, FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    ).features
    ends = stage_ends(features)
    if not 1 <= num_levels <= len(ends):
        raise ValueError(f"num_levels must be in [1, {len(ends)}], got {num_levels}")
    levels = ends[-num_levels:]

    # Trainable stages counted from the top, as torchvision's _mobilenet_extractor does.
    starts = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    starts.append(len(features) - 1)
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else len(starts)
    if not 0 <= trainable_layers <= len(starts):
        raise ValueError(f"trainable_layers must be in [0, {len(starts)}], got {trainable_layers}")
    freeze_before = (
        len(features) if trainable_layers == 0 else starts[len(starts) - trainable_layers]
    )
    for block in features[:freeze_before]:
        block.requires_grad_(False)

    backbone = BackboneWithFPN(
        features,
        return_layers={str(i): str(k) for k, (i, _, _) in enumerate(levels)},
        in_channels_list=[c for _, _, c in levels],
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    strides = [s for _, s, _ in levels]
    return backbone, strides + [strides[-1] * 2]


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


def maskrcnn_mobilenet_v2_fpn(
    num_classes: int,
    *,
    weights_backbone: Any = "IMAGENET1K_V1",
    trainable_backbone_layers: int | None = None,
    num_levels: int = 3,
    fpn_channels: int = 256,
    mask_head_channels: int = 256,
    mask_head_norm: bool = False,
    with_masks: bool = True,
    **options: Any,
) -> FasterRCNN:
    """Mask R-CNN (or Faster R-CNN with ``with_masks=False``) on a MobileNetV2-FPN backbone.

    Anchors: sizes 4x and 8x each level's stride, ratios 0.5/1/2; the RoI poolers read every
    level but the max-pool one -- all derived from the backbone's real strides.
    """
    backbone, strides = mobilenet_v2_fpn_backbone(
        weights_backbone,
        trainable_layers=trainable_backbone_layers,
        num_levels=num_levels,
        fpn_channels=fpn_channels,
    )
    anchors = AnchorGenerator(
        sizes=tuple((4 * s, 8 * s) for s in strides),
        aspect_ratios=(ASPECT_RATIOS,) * len(strides),
    )
    names = [str(k) for k in range(num_levels)]
    box_pool = fixed_scale_pooler(names, 7, strides[:num_levels])
    if not with_masks:
        return FasterRCNN(
            backbone, num_classes, rpn_anchor_generator=anchors, box_roi_pool=box_pool, **options
        )
    mask_pool = fixed_scale_pooler(names, 14, strides[:num_levels])
    representation = 1024
    # BatchNorm in the from-scratch mask head (as torchvision's v2 models do) speeds its start.
    norm = nn.BatchNorm2d if mask_head_norm else None
    mask_head = MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1, norm_layer=norm)
    mask_predictor = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes)
    return MaskRCNN(
        backbone,
        None,  # the class count lives in box_predictor/mask_predictor given here
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        mask_roi_pool=mask_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
        **options,
    )
