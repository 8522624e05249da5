"""Models: one registry of builders for situation A (COCO-pretrained torchvision detectors with new
class layers) and situation B (a detector head on another ImageNet backbone)."""

from detfit.models.registry import (
    MODELS,
    ModelSpec,
    build_model,
    get_spec,
    iou_types,
    options_not_taken,
)

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "get_spec",
    "options_not_taken",
    "iou_types",
]
