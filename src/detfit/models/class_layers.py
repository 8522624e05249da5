"""Replace only the class-dependent layers of a detector, keeping every other pretrained tensor.

Each family lays its class outputs out differently (R-CNN: one row per class; RetinaNet/FCOS: one
conv with anchors x classes rows, anchor-major; SSD/SSDLite: one such conv per feature level;
Keypoint R-CNN: one deconv channel per keypoint). ``keep`` maps each new class index to the
pretrained index whose rows it inherits (None: freshly initialised), so a head can keep, e.g., its
COCO ``person`` and background rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

Keep = Sequence[int | None]  # new index -> pretrained index (None: fresh)

# R-CNN state-dict entries the replacement renews; everything else is kept.
CLASS_DEPENDENT_PREFIXES = (
    "roi_heads.box_predictor.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)


def _copy_rows(
    new: nn.Module, old: nn.Module, keep: Keep, old_count: int, groups: int = 1, inner: int = 1
) -> None:
    """Copy kept rows of ``old`` into ``new``; outputs are laid out [groups][classes][inner].

    ConvTranspose2d keeps its outputs on weight dim 1, every other layer on dim 0.
    """
    pairs = [
        ((g * len(keep) + j) * inner + r, (g * old_count + c) * inner + r)
        for g in range(groups)
        for j, c in enumerate(keep)
        if c is not None
        for r in range(inner)
    ]
    if not pairs:
        return
    new_idx, old_idx = (torch.tensor(ix) for ix in zip(*pairs, strict=True))
    dim = 1 if isinstance(old, nn.ConvTranspose2d) else 0
    with torch.no_grad():
        new.weight.index_copy_(dim, new_idx, old.weight.index_select(dim, old_idx))
        if old.bias is not None:
            new.bias.index_copy_(0, new_idx, old.bias.index_select(0, old_idx))


def _conv_like(old: nn.Conv2d, out_channels: int, init: Callable[[nn.Conv2d], None]) -> nn.Conv2d:
    new = nn.Conv2d(
        old.in_channels, out_channels, old.kernel_size, old.stride, old.padding, groups=old.groups
    )
    init(new)
    return new


def _normal_init(std: float, bias: float = 0.0) -> Callable[[nn.Conv2d], None]:
    def init(conv: nn.Conv2d) -> None:
        nn.init.normal_(conv.weight, std=std)
        nn.init.constant_(conv.bias, bias)

    return init


def _xavier_init(conv: nn.Conv2d) -> None:
    nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)


def _kaiming_init(conv: nn.Module) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)


# RetinaNet and FCOS start every class logit at a 1% foreground prior, as torchvision does.
_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def _replace_rcnn(model: nn.Module, keep: Keep) -> None:
    heads = model.roi_heads
    old = heads.box_predictor
    old_count = old.cls_score.out_features
    heads.box_predictor = FastRCNNPredictor(old.cls_score.in_features, len(keep))
    _copy_rows(heads.box_predictor.cls_score, old.cls_score, keep, old_count)
    _copy_rows(heads.box_predictor.bbox_pred, old.bbox_pred, keep, old_count, inner=4)
    if getattr(heads, "mask_predictor", None) is not None:
        # the class-agnostic upsampling conv keeps its pretrained weights
        logits = heads.mask_predictor.mask_fcn_logits
        new = nn.Conv2d(logits.in_channels, len(keep), kernel_size=1)
        _kaiming_init(new)
        _copy_rows(new, logits, keep, logits.out_channels)
        heads.mask_predictor.mask_fcn_logits = new


def _replace_dense(model: RetinaNet | FCOS, keep: Keep) -> None:
    head = model.head.classification_head
    anchors = head.num_anchors if hasattr(head, "num_anchors") else 1
    old = head.cls_logits
    head.cls_logits = _conv_like(old, anchors * len(keep), _normal_init(0.01, _PRIOR_BIAS))
    _copy_rows(head.cls_logits, old, keep, head.num_classes, groups=anchors)
    head.num_classes = len(keep)


def _replace_ssd(model: SSD, keep: Keep) -> None:
    head = model.head.classification_head
    old_count = head.num_columns
    for i, block in enumerate(head.module_list):
        lite = isinstance(block, nn.Sequential)  # SSDLite: depthwise block, then a 1x1 conv
        old = block[-1] if lite else block
        anchors = old.out_channels // old_count
        init = _normal_init(0.03) if lite else _xavier_init
        new = _conv_like(old, anchors * len(keep), init)
        _copy_rows(new, old, keep, old_count, groups=anchors)
        if lite:
            block[-1] = new
        else:
            head.module_list[i] = new
    head.num_columns = len(keep)


def replace_class_layers(model: nn.Module, keep: Keep) -> None:
    """New class-dependent layers for ``len(keep)`` classes (background included)."""
    if isinstance(model, (RetinaNet, FCOS)):
        _replace_dense(model, keep)
    elif isinstance(model, SSD):
        _replace_ssd(model, keep)
    else:
        _replace_rcnn(model, keep)


def replace_keypoint_layer(model: nn.Module, keep: Keep) -> None:
    """A new keypoint predictor for ``len(keep)`` keypoints; the head below it is kept."""
    heads = model.roi_heads
    old = heads.keypoint_predictor.kps_score_lowres
    heads.keypoint_predictor = KeypointRCNNPredictor(old.in_channels, len(keep))
    _copy_rows(heads.keypoint_predictor.kps_score_lowres, old, keep, old.out_channels)


def class_dependent_modules(model: nn.Module) -> list[str]:
    """Names of the modules :func:`replace_class_layers`/``replace_keypoint_layer`` renew."""
    if isinstance(model, (RetinaNet, FCOS)):
        return ["head.classification_head.cls_logits"]
    if isinstance(model, SSD):
        blocks = model.head.classification_head.module_list
        return [
            f"head.classification_head.module_list.{i}"
            + (".1" if isinstance(b, nn.Sequential) else "")
            for i, b in enumerate(blocks)
        ]
    names = ["roi_heads.box_predictor"]
    if getattr(model.roi_heads, "mask_predictor", None) is not None:
        names.append("roi_heads.mask_predictor.mask_fcn_logits")
    if getattr(model.roi_heads, "keypoint_predictor", None) is not None:
        names.append("roi_heads.keypoint_predictor")
    return names
