"""The one registry of models: name -> builder, task, weights and defaults.

The CLI, the config, checkpoints and ``detfit models`` all read model facts from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from torch import nn
from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models import detection as tvd

from detfit.errors import DetfitError
from detfit.models import mobilenet
from detfit.models.torchvision_rcnn import build_pretrained_rcnn
from detfit.models.weights import NO_WEIGHTS


@dataclass(frozen=True)
class ModelSpec:
    """What detfit knows about one architecture."""

    name: str
    build: Callable[..., nn.Module]  # build(num_classes, *, weights, weights_backbone, **options)
    has_masks: bool
    description: str
    weights_enum: type[WeightsEnum] | None = None  # situation A: full-detector weights
    backbone_enum: type[WeightsEnum] | None = None
    default_weights: str | None = None
    default_weights_backbone: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # model options used unless overridden

    @property
    def task(self) -> str:
        return "instance-segmentation" if self.has_masks else "detection"


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} registered twice")
    MODELS[spec.name] = spec
    return spec


def _situation_a(name: str, builder, weights_enum, has_masks: bool, description: str) -> None:
    def build(num_classes: int, *, weights=None, weights_backbone=None, **options) -> nn.Module:
        return build_pretrained_rcnn(
            builder,
            weights_enum,
            ResNet50_Weights,
            num_classes,
            weights=weights,
            weights_backbone=weights_backbone,
            has_masks=has_masks,
            **options,
        )

    register(
        ModelSpec(
            name=name,
            build=build,
            has_masks=has_masks,
            description=description,
            weights_enum=weights_enum,
            backbone_enum=ResNet50_Weights,
            default_weights="DEFAULT",
            default_weights_backbone=None,
        )
    )


_situation_a(
    "maskrcnn_resnet50_fpn",
    tvd.maskrcnn_resnet50_fpn,
    tvd.MaskRCNN_ResNet50_FPN_Weights,
    True,
    "Mask R-CNN ResNet-50-FPN (the tutorial's model), COCO weights",
)
_situation_a(
    "maskrcnn_resnet50_fpn_v2",
    tvd.maskrcnn_resnet50_fpn_v2,
    tvd.MaskRCNN_ResNet50_FPN_V2_Weights,
    True,
    "Mask R-CNN ResNet-50-FPN v2 (improved recipe), COCO weights",
)
_situation_a(
    "fasterrcnn_resnet50_fpn",
    tvd.fasterrcnn_resnet50_fpn,
    tvd.FasterRCNN_ResNet50_FPN_Weights,
    False,
    "Faster R-CNN ResNet-50-FPN, COCO weights",
)
_situation_a(
    "fasterrcnn_resnet50_fpn_v2",
    tvd.fasterrcnn_resnet50_fpn_v2,
    tvd.FasterRCNN_ResNet50_FPN_V2_Weights,
    False,
    "Faster R-CNN ResNet-50-FPN v2 (improved recipe), COCO weights",
)


def _situation_b(name: str, fn, has_masks: bool, description: str, **defaults) -> None:
    def build(num_classes: int, *, weights=None, weights_backbone="IMAGENET1K_V1", **options):
        if weights not in NO_WEIGHTS:
            raise DetfitError(
                f"{name}: torchvision has no full-detector weights for it; set weights_backbone "
                "(or --resume a run of it)"
            )
        return fn(num_classes, weights_backbone=weights_backbone, **options)

    register(
        ModelSpec(
            name=name,
            build=build,
            has_masks=has_masks,
            description=description,
            backbone_enum=MobileNet_V2_Weights,
            default_weights=None,
            default_weights_backbone="IMAGENET1K_V1",
            defaults=defaults,
        )
    )


_situation_b(
    "fasterrcnn_mobilenet_v2",
    mobilenet.fasterrcnn_mobilenet_v2,
    False,
    "the seed's situation B: Faster R-CNN on MobileNetV2 features (one 1280-ch map)",
)
_situation_b(
    "maskrcnn_mobilenet_v2_fpn",
    mobilenet.maskrcnn_mobilenet_v2_fpn,
    True,
    "Mask R-CNN on an ImageNet MobileNetV2-FPN backbone (the CPU recipe's model)",
)
_situation_b(
    "fasterrcnn_mobilenet_v2_fpn",
    partial(mobilenet.maskrcnn_mobilenet_v2_fpn, with_masks=False),
    False,
    "Faster R-CNN on an ImageNet MobileNetV2-FPN backbone",
)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise DetfitError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


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
    name, a local file, or None. ``options`` go to the torchvision constructor (min_size,
    box_detections_per_img, ...) or the backbone (trainable_backbone_layers, ...).
    """
    spec = get_spec(name)
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
        **{**spec.defaults, **options},
    )


def model_info(
    name: str, num_classes: int, classes: list[str] | None, options: dict, model: nn.Module
) -> dict:
    """Everything needed to rebuild ``model`` from a checkpoint alone."""
    from detfit.models.structure import describe_structure

    return {
        "name": name,
        "num_classes": num_classes,
        "classes": list(classes) if classes else None,
        "options": dict(options),
        "structure": describe_structure(model),
    }


def rebuild_model(info: dict, state_dict: dict | None = None) -> nn.Module:
    """The exact architecture recorded by :func:`model_info`, with no pretrained file needed."""
    import warnings

    from detfit.models.structure import apply_structure

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # "trainable layers has no effect" from scratch
        model = build_model(
            info["name"],
            info["num_classes"],
            weights=None,
            weights_backbone=None,
            **info["options"],
        )
    apply_structure(model, info.get("structure", {}))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model
