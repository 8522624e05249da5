"""Replace only the class-dependent layers of a detector, keeping every other pretrained tensor."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor


def replace_box_predictor(model: nn.Module, num_classes: int) -> None:
    """New classification and box-regression layers for ``num_classes`` (background included)."""
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)


def replace_mask_logits(model: nn.Module, num_classes: int) -> None:
    """New per-class mask logits; the class-agnostic upsampling conv keeps its pretrained weights."""
    predictor = model.roi_heads.mask_predictor
    old = predictor.mask_fcn_logits
    new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(new.bias)
    predictor.mask_fcn_logits = new


# Names of the state-dict entries the replacement above renews; everything else is kept.
CLASS_DEPENDENT_PREFIXES = (
    "roi_heads.box_predictor.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)
