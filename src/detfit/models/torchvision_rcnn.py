"""Situation A: a COCO-pretrained torchvision R-CNN with its class layers replaced for K classes.

The model is always built by torchvision's own builder, so FrozenBatchNorm, trainable backbone
layers and strict state-dict loading follow torchvision's rules; a local file is handed to the
builder in place of the download.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from torch import nn
from torchvision.models import WeightsEnum

from detfit.errors import DetfitError
from detfit.models.heads import replace_box_predictor, replace_mask_logits
from detfit.models.weights import ensure_cached, load_state_dict_file, resolve_weights


@contextmanager
def _state_from_file(enum_cls: type[WeightsEnum], path: Path):
    """Serve a local file wherever the builder asks the Weights API for its state dict."""
    state = load_state_dict_file(path)
    with mock.patch.object(enum_cls, "get_state_dict", lambda self, *a, **k: state):
        yield


def build_pretrained_rcnn(
    builder: Callable[..., nn.Module],
    weights_enum: type[WeightsEnum],
    backbone_enum: type[WeightsEnum] | None,
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    has_masks: bool = False,
    **options: Any,
) -> nn.Module:
    """Build ``builder`` from COCO weights (enum or file) or from scratch, heads for ``num_classes``."""
    spec = resolve_weights(weights, weights_enum)
    if spec is None:
        backbone_spec = resolve_weights(weights_backbone, backbone_enum)
        if isinstance(backbone_spec, Path):
            with _state_from_file(backbone_enum, backbone_spec):
                return builder(
                    weights=None,
                    weights_backbone=backbone_enum.DEFAULT,
                    num_classes=num_classes,
                    trainable_backbone_layers=trainable_backbone_layers,
                    **options,
                )
        if backbone_spec is not None:
            ensure_cached(backbone_spec)
        return builder(
            weights=None,
            weights_backbone=backbone_spec,
            num_classes=num_classes,
            trainable_backbone_layers=trainable_backbone_layers,
            **options,
        )

    kwargs = dict(
        weights_backbone=None, trainable_backbone_layers=trainable_backbone_layers, **options
    )
    try:
        if isinstance(spec, Path):
            with _state_from_file(weights_enum, spec):
                model = builder(weights=weights_enum.DEFAULT, **kwargs)
        else:
            ensure_cached(spec)
            model = builder(weights=spec, **kwargs)
    except RuntimeError as exc:  # strict load_state_dict: wrong architecture or class count
        if isinstance(exc, DetfitError):
            raise
        first = str(exc).strip().splitlines()[0]
        raise DetfitError(f"{weights}: does not fit {builder.__name__} ({first})") from None
    replace_box_predictor(model, num_classes)
    if has_masks:
        replace_mask_logits(model, num_classes)
    return model
