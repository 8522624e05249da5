"""Situation B: a detector head (Faster/Mask R-CNN, RetinaNet, FCOS) on an ImageNet backbone.

Anchors and RoI poolers are derived from the backbone's real strides and feature names:
one feature map: the tutorial's sizes, 1x to 16x the stride (32-512 px at stride 32), ratios 0.5/1/2;
FPN: R-CNN 4x and 8x each level's stride, RetinaNet torchvision's three octave steps from 4x the
stride, FCOS one anchor the size of the stride (as torchvision's FCOS).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from detfit.errors import DetfitError
from detfit.models.backbones import Backbone, build_backbone, fixed_scale_pooler
from detfit.models.options import apply_post_build, constructor_options
from detfit.models.weights import NO_WEIGHTS, is_local_file

HEADS = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
MASK_HEAD_OPTIONS = ("mask_head_channels", "mask_head_norm", "mask_levels")  # Mask R-CNN only
FPN_OPTIONS = ("num_levels", "fpn_channels")  # <head>_<backbone>_fpn only
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def derived_anchors(head: str, backbone: Backbone, fpn: bool) -> AnchorGenerator:
    strides = backbone.strides
    if head == "fcos":  # FCOS needs one anchor per location: its size sets the level's range
        return AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    if not fpn:
        sizes = (tuple(strides[0] * 2**k for k in range(5)),)
    elif head == "retinanet":
        sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides)
    else:
        sizes = tuple((4 * s, 8 * s) for s in strides)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))


def build_detector(
    head: str,
    backbone_name: str,
    fpn: bool,
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: Any = "IMAGENET1K_V1",
    trainable_backbone_layers: int | None = None,
    num_levels: int | None = None,
    fpn_channels: int | None = None,
    mask_head_channels: int = 256,
    mask_head_norm: bool = False,
    mask_levels: int | None = None,
    **options: Any,
) -> nn.Module:
    """``head`` on ``backbone_name`` (with an FPN when ``fpn``) for ``num_classes``.

    ``num_levels``/``fpn_channels``: FPN levels (from stride 32 down, default 3) and width;
    ``mask_head_channels``/``mask_head_norm``: Mask R-CNN's mask head width and BatchNorm (which
    speeds up the start of a from-scratch head, as torchvision's v2 models do);
    ``mask_levels``: the mask pooler reads only the finest N levels (finer mask boundaries).
    """
    name = f"{head}_{backbone_name}" + ("_fpn" if fpn else "")
    if weights not in NO_WEIGHTS and is_local_file(weights):
        raise DetfitError(
            f"--weights {weights}: {name} is detfit's own combination, so no detector weights "
            "file fits it; continue a run of it with --resume, or start from its backbone's "
            "weights (--weights-backbone)"
        )
    if weights not in NO_WEIGHTS:
        raise DetfitError(
            f"{name}: torchvision has no full-detector weights for it; set weights_backbone "
            "(or --resume a run of it)"
        )
    fpn_channels = fpn_channels or 256
    backbone = build_backbone(
        backbone_name,
        weights_backbone,
        fpn=fpn,
        extra="p6p7" if head in ("retinanet", "fcos") else "pool",
        trainable_layers=trainable_backbone_layers,
        num_levels=num_levels or 3,
        fpn_channels=fpn_channels,
    )
    anchors = derived_anchors(head, backbone, fpn)
    dense = head in ("retinanet", "fcos")
    kwargs = constructor_options(name, "dense" if dense else "rcnn", options)
    try:
        mask_head = (mask_head_channels, mask_head_norm, mask_levels)
        model = _assemble(head, backbone, anchors, num_classes, mask_head, kwargs)
    except TypeError as exc:  # a value of the wrong kind for the constructor
        raise DetfitError(
            f"{name}: torchvision refused a model option ({str(exc).splitlines()[0]})"
        ) from None
    return apply_post_build(model, name, options)


def _assemble(
    head: str,
    backbone: Backbone,
    anchors: AnchorGenerator,
    num_classes: int,
    mask_head: tuple[int, bool, int | None],
    kwargs: dict[str, Any],
) -> nn.Module:
    module, names = backbone.module, backbone.names
    if head == "retinanet":
        return RetinaNet(module, num_classes, anchor_generator=anchors, **kwargs)
    if head == "fcos":
        return FCOS(module, num_classes, anchor_generator=anchors, **kwargs)
    pool_strides = backbone.strides[: len(names)]
    box_pool = fixed_scale_pooler(names, 7, pool_strides)
    if head == "fasterrcnn":
        return FasterRCNN(
            module, num_classes, rpn_anchor_generator=anchors, box_roi_pool=box_pool, **kwargs
        )
    channels = module.out_channels
    mask_channels, mask_norm, mask_levels = mask_head
    if mask_levels is not None and not 1 <= mask_levels <= len(names):
        raise DetfitError(f"mask_levels must be in [1, {len(names)}], got {mask_levels}")
    mask_names = names[: mask_levels or len(names)]
    mask_pool = fixed_scale_pooler(mask_names, 14, pool_strides[: len(mask_names)])
    representation = 1024
    norm = nn.BatchNorm2d if mask_norm else None
    mask_head_module = MaskRCNNHeads(channels, (mask_channels,) * 4, 1, norm_layer=norm)
    mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes)
    return MaskRCNN(
        module,
        None,  # the class count lives in box_predictor/mask_predictor given here
        rpn_anchor_generator=anchors,
        box_roi_pool=box_pool,
        mask_roi_pool=mask_pool,
        mask_head=mask_head_module,
        mask_predictor=mask_predictor,
        box_predictor=FastRCNNPredictor(representation, num_classes),
        box_head=TwoMLPHead(channels * 7 * 7, representation),
        **kwargs,
    )
