"""The one registry of models: name -> builder, task, weights and the options it takes.

Situation A: every detection builder in torchvision, built with its COCO weights and new class
layers. Situation B: ``<head>_<backbone>`` (one feature map, the tutorial's way) and
``<head>_<backbone>_fpn`` for every head in :data:`HEADS` and backbone in :data:`BACKBONES`, except
the names torchvision already builds (those are situation A models, which also take an
ImageNet-only backbone with ``weights=None``). The CLI, the config, checkpoints and
``detfit models`` all read model facts from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn
from torchvision.models import WeightsEnum, get_model_weights
from torchvision.models import detection as tvd

from detfit.errors import DetfitError
from detfit.models.backbone_detectors import (
    FPN_OPTIONS,
    HEADS,
    MASK_HEAD_OPTIONS,
    build_detector,
)
from detfit.models.backbones import BACKBONES, backbone_enum
from detfit.models.options import constructor_option_names
from detfit.models.pretrained import build_pretrained


@dataclass(frozen=True)
class ModelSpec:
    """What detfit knows about one architecture."""

    name: str
    build: Callable[..., nn.Module]  # build(num_classes, *, weights, weights_backbone, **options)
    description: str
    has_masks: bool = False
    has_keypoints: bool = False
    weights_enum: type[WeightsEnum] | None = None  # situation A: full-detector weights
    backbone_enum: type[WeightsEnum] | None = None
    backbone: str | None = None  # situation B: the torchvision classifier it is built on
    default_weights: str | None = None
    default_weights_backbone: str | None = None
    # The model options it takes (config model_options keys), stated once here: every check of
    # whether an option applies to this model reads it.
    options: frozenset[str] = field(default_factory=frozenset)

    def takes(self, option: str) -> bool:
        """Whether ``option`` (a model_options key) applies to this model."""
        return option in self.options

    @property
    def task(self) -> str:
        if self.has_keypoints:
            return "keypoints"
        return "instance-segmentation" if self.has_masks else "detection"

    @property
    def situation(self) -> str:
        return "A" if self.weights_enum is not None else "B"


MODELS: dict[str, ModelSpec] = {}


def register(
    name: str, build: Callable[..., nn.Module], description: str, **facts: Any
) -> ModelSpec:
    """Add ``name``; ``facts`` are the other :class:`ModelSpec` fields."""
    if name in MODELS:
        raise ValueError(f"model {name!r} registered twice")
    has_masks = name.startswith("maskrcnn")
    has_keypoints = name.startswith("keypointrcnn")
    MODELS[name] = ModelSpec(
        name, build, description, has_masks=has_masks, has_keypoints=has_keypoints, **facts
    )
    return MODELS[name]


# Situation A: name -> (family, backbone weights, description). Families group the constructors
# that share option names (see detfit.models.options).
TORCHVISION: dict[str, tuple[str, str, str]] = {
    "maskrcnn_resnet50_fpn": ("rcnn", "resnet50", "Mask R-CNN ResNet-50-FPN (the tutorial's)"),
    "maskrcnn_resnet50_fpn_v2": ("rcnn", "resnet50", "Mask R-CNN ResNet-50-FPN v2 recipe"),
    "fasterrcnn_resnet50_fpn": ("rcnn", "resnet50", "Faster R-CNN ResNet-50-FPN"),
    "fasterrcnn_resnet50_fpn_v2": ("rcnn", "resnet50", "Faster R-CNN ResNet-50-FPN v2 recipe"),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        "rcnn",
        "mobilenet_v3_large",
        "Faster R-CNN MobileNetV3-Large-FPN",
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        "rcnn",
        "mobilenet_v3_large",
        "Faster R-CNN MobileNetV3-Large-FPN at 320 px",
    ),
    "keypointrcnn_resnet50_fpn": ("rcnn", "resnet50", "Keypoint R-CNN ResNet-50-FPN (people)"),
    "retinanet_resnet50_fpn": ("dense", "resnet50", "RetinaNet ResNet-50-FPN"),
    "retinanet_resnet50_fpn_v2": ("dense", "resnet50", "RetinaNet ResNet-50-FPN v2 recipe"),
    "fcos_resnet50_fpn": ("dense", "resnet50", "FCOS ResNet-50-FPN"),
    "ssd300_vgg16": ("ssd", "vgg16", "SSD300 VGG-16 (fixed 300 px input)"),
    "ssdlite320_mobilenet_v3_large": ("ssd", "mobilenet_v3_large", "SSDLite MobileNetV3-Large"),
}

# Options every model takes, and those that reshape anchors (SSD's default boxes are fixed).
_EVERY_MODEL = {"trainable_backbone_layers"}
_ANCHORS = {"anchor_sizes", "aspect_ratios"}


def pretrained_options(name: str, family: str) -> frozenset[str]:
    """The options of situation A model ``name``: its constructor's, anchors (not SSD), SSDLite's
    input size, the pretrained rows kept, and the keypoint count of Keypoint R-CNN."""
    names = constructor_option_names(name, family) | _EVERY_MODEL | {"keep_classes"}
    if family != "ssd":
        names |= _ANCHORS
    elif name.startswith("ssdlite"):
        names.add("size")  # the VGG extra layers fix SSD300's input at 300 px
    if name.startswith("keypointrcnn"):
        names |= {"num_keypoints", "keep_keypoints"}
    return frozenset(names)


def detector_options(head: str, fpn: bool) -> frozenset[str]:
    """The options of situation B model ``<head>_<backbone>[_fpn]``: its constructor's, anchors,
    FPN levels and width with an FPN, the mask head's for Mask R-CNN."""
    family = "dense" if head in ("retinanet", "fcos") else "rcnn"
    names = constructor_option_names(head, family) | _EVERY_MODEL | _ANCHORS
    if fpn:
        names |= set(FPN_OPTIONS)
    if head == "maskrcnn":
        names |= set(MASK_HEAD_OPTIONS)
    return frozenset(names)


for _name, (_family, _backbone, _description) in TORCHVISION.items():
    _weights, _backbone_weights = get_model_weights(_name), get_model_weights(_backbone)
    register(
        _name,
        partial(build_pretrained, _name, getattr(tvd, _name), _weights, _backbone_weights, _family),
        _description + ", COCO weights",
        weights_enum=_weights,
        backbone_enum=_backbone_weights,
        default_weights="DEFAULT",
        options=pretrained_options(_name, _family),
    )

# Situation B models with a story of their own.
_NOTES = {
    "fasterrcnn_mobilenet_v2": "the tutorial's situation B: Faster R-CNN on MobileNetV2 features",
    "maskrcnn_mobilenet_v2_fpn": "Mask R-CNN on an ImageNet MobileNetV2-FPN (the CPU recipe's)",
}
_HEAD_NAMES = {
    "fasterrcnn": "Faster R-CNN",
    "maskrcnn": "Mask R-CNN",
    "retinanet": "RetinaNet",
    "fcos": "FCOS",
}
for _backbone in BACKBONES:
    for _head in HEADS:
        for _fpn in (False, True):
            _name = f"{_head}_{_backbone}" + ("_fpn" if _fpn else "")
            if _name in MODELS:
                continue  # torchvision builds it: situation A
            _what = "an FPN over" if _fpn else "one feature map of"
            register(
                _name,
                partial(build_detector, _head, _backbone, _fpn),
                _NOTES.get(_name, f"{_HEAD_NAMES[_head]} on {_what} ImageNet {_backbone}"),
                backbone_enum=backbone_enum(_backbone),
                backbone=_backbone,
                default_weights_backbone="IMAGENET1K_V1",
                options=detector_options(_head, _fpn),
            )


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise DetfitError(
            f"unknown model {name!r}; `detfit models` lists them (e.g. {', '.join(list(MODELS)[:4])})"
        ) from None


def options_not_taken(name: str, options: dict[str, Any]) -> list[str]:
    """The keys of ``options`` that model ``name`` does not take (its spec's ``options``)."""
    spec = get_spec(name)
    return [k for k in options if not spec.takes(k)]


def _why_not_taken(name: str, key: str) -> str | None:
    """Why model ``name`` does not take option ``key``, where a reason is worth a word."""
    ssd = name.startswith("ssd")
    if key in FPN_OPTIONS:
        return f"{'/'.join(FPN_OPTIONS)} need an FPN ({name}_fpn)"
    if key in MASK_HEAD_OPTIONS:
        return f"{'/'.join(MASK_HEAD_OPTIONS)} are Mask R-CNN options"
    if key in ("num_keypoints", "keep_keypoints"):
        return "num_keypoints/keep_keypoints are Keypoint R-CNN options"
    if ssd and key in ("min_size", "max_size"):
        return f"SSD resizes to a fixed square; set size, not {key}"
    if ssd and key in _ANCHORS:
        return "SSD default boxes are fixed; anchor_sizes/aspect_ratios do not apply"
    if ssd and key == "size":
        return "the VGG extra layers fix the input at 300 px"
    if key == "size":
        return "size is an SSD option; use min_size/max_size"
    return None


def options_refusal(name: str, keys: list[str]) -> str:
    """The one line for options model ``name`` does not take: why, or else what it takes."""
    reasons = list(dict.fromkeys(r for r in (_why_not_taken(name, k) for k in keys) if r))
    unknown = [k for k in keys if _why_not_taken(name, k) is None]
    if unknown:
        reasons.append(
            f"unknown model option(s) for it; it takes {', '.join(sorted(get_spec(name).options))}"
        )
    return f"{name} does not take model option(s) {', '.join(keys)}: {'; '.join(reasons)}"


def iou_types(model: str | nn.Module) -> list[str]:
    """What a model is scored on: bbox always, segm with masks, keypoints with keypoints.

    By name the registry answers; a model object (the tutorial builds its own) answers by the
    heads it has.
    """
    if isinstance(model, str):
        spec = get_spec(model)
        masks, keypoints = spec.has_masks, spec.has_keypoints
    else:
        heads = getattr(model, "roi_heads", None)
        masks = getattr(heads, "mask_predictor", None) is not None
        keypoints = getattr(heads, "keypoint_predictor", None) is not None
    return ["bbox"] + ["segm"] * masks + ["keypoints"] * keypoints


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: Any = "default",
    weights_backbone: Any = "default",
    **options: Any,
) -> nn.Module:
    """Build a registered model for ``num_classes`` (background included).

    ``weights``/``weights_backbone``: ``"default"`` (the registry's choice), ``DEFAULT``, an enum
    name, a local file, or None. ``options`` are plain settings (see detfit.models.options):
    min_size, max_size, trainable_backbone_layers, anchor_sizes, aspect_ratios,
    detections_per_img, score_thresh, nms_thresh, keep_classes, ... or any keyword of the
    torchvision constructor.
    """
    spec = get_spec(name)
    not_taken = options_not_taken(name, options)
    if not_taken:  # every builder below may take its options as they come
        raise DetfitError(options_refusal(name, not_taken))
    if num_classes < 2:
        raise DetfitError(f"num_classes must count the background too (>= 2), got {num_classes}")
    if weights == "default":
        weights = spec.default_weights
    if weights_backbone == "default":
        weights_backbone = spec.default_weights_backbone
    return spec.build(
        num_classes,
        weights=weights,
        weights_backbone=weights_backbone,
        **options,
    )
