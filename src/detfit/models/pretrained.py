"""Situation A: a COCO-pretrained torchvision detector with its class layers replaced for K classes.

The model is always built by torchvision's own builder, so FrozenBatchNorm, eps overrides,
trainable backbone layers and strict state-dict loading follow torchvision's rules; a local file
is handed to the builder in place of the download.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from torch import nn
from torchvision.models import WeightsEnum

from detfit.errors import DetfitError
from detfit.models.class_layers import Keep, replace_class_layers, replace_keypoint_layer
from detfit.models.options import apply_post_build, constructor_options
from detfit.models.weights import ensure_cached, load_state_dict_file, resolve_weights


@contextmanager
def served(enum_cls: type[WeightsEnum] | None, spec: WeightsEnum | Path | None) -> Iterator[Any]:
    """The enum member to hand a torchvision builder: a cached one, or DEFAULT serving a file."""
    if isinstance(spec, Path):
        state = load_state_dict_file(spec)
        with mock.patch.object(enum_cls, "get_state_dict", lambda self, *a, **k: state):
            yield enum_cls.DEFAULT
        return
    if spec is not None:
        ensure_cached(spec)
    yield spec


def kept_rows(
    names: Sequence[str] | None, known: Sequence[str], count: int, what: str, background: bool
) -> Keep:
    """New index -> pretrained index for ``count`` outputs, keeping ``names`` (in that order).

    With ``background`` the first output is the background, which keeps its row whenever any
    class does.
    """
    if not names:
        return [None] * count
    names = [names] if isinstance(names, str) else list(names)
    first = int(background)
    if len(names) + first > count:
        raise DetfitError(f"keep_{what}: {len(names)} names do not fit {count} outputs")
    if len(set(names)) != len(names):
        raise DetfitError(f"keep_{what}: names repeat ({', '.join(names)})")
    usable = [n for n in known[first:] if n != "N/A"]
    rows = []
    for name in names:
        if name not in usable:
            raise DetfitError(f"keep_{what}: {name!r} is not one of the weights' {what}")
        rows.append(known.index(name))
    return [0] * first + rows + [None] * (count - first - len(rows))


def build_pretrained(
    name: str,
    builder: Callable[..., nn.Module],
    weights_enum: type[WeightsEnum],
    backbone_enum: type[WeightsEnum],
    family: str,
    num_classes: int,
    *,
    weights: Any = None,
    weights_backbone: Any = None,
    trainable_backbone_layers: int | None = None,
    keep_classes: Sequence[str] | None = None,
    num_keypoints: int | None = None,
    keep_keypoints: Sequence[str] | None = None,
    **options: Any,
) -> nn.Module:
    """Build ``builder`` from COCO weights (enum or file) or from scratch, for ``num_classes``.

    ``keep_classes``/``keep_keypoints``: names from the weights' categories/keypoint names whose
    pretrained rows the new layers keep (new indices 1, 2, ... in the order given).
    """
    keypoints = "keypoint" in name
    kwargs = constructor_options(name, family, options)
    kwargs["trainable_backbone_layers"] = trainable_backbone_layers
    spec = resolve_weights(weights, weights_enum)
    if spec is None and (keep_classes or keep_keypoints):
        raise DetfitError(f"{name}: keep_classes/keep_keypoints need pretrained weights")
    try:
        if spec is None:
            if keypoints:
                kwargs["num_keypoints"] = num_keypoints or 17
            backbone_spec = resolve_weights(weights_backbone, backbone_enum)
            with served(backbone_enum, backbone_spec) as member:
                model = builder(
                    weights=None, weights_backbone=member, num_classes=num_classes, **kwargs
                )
            return apply_post_build(model, name, options)
        with served(weights_enum, spec) as member:
            model = builder(weights=member, weights_backbone=None, **kwargs)
    except TypeError as exc:  # a value of the wrong kind for the constructor
        raise DetfitError(
            f"{name}: torchvision refused a model option ({str(exc).splitlines()[0]})"
        ) from None
    except RuntimeError as exc:  # strict load_state_dict: wrong architecture or class count
        if isinstance(exc, DetfitError):
            raise
        first = str(exc).strip().splitlines()[0]
        raise DetfitError(f"{weights}: does not fit {name} ({first})") from None
    meta = (spec if isinstance(spec, WeightsEnum) else weights_enum.DEFAULT).meta
    replace_class_layers(
        model, kept_rows(keep_classes, meta["categories"], num_classes, "classes", True)
    )
    if keypoints:
        count = num_keypoints or len(keep_keypoints or ()) or len(meta["keypoint_names"])
        keep = kept_rows(keep_keypoints, meta["keypoint_names"], count, "keypoints", False)
        replace_keypoint_layer(model, keep)
    return apply_post_build(model, name, options)
