"""Model options as plain settings (the config's ``model_options``), the same names for every family.

Most go to the torchvision constructor; a few are renamed for R-CNNs (whose detection settings
carry a ``box_`` prefix) or applied after building (anchors, SSD input size), so that one recipe
spells them once and a checkpoint's options rebuild the identical model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from numbers import Number
from typing import Any

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.keypoint_rcnn import KeypointRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

from detfit.errors import DetfitError

# Options applied to the built model, not passed to its constructor.
SET_AFTER_BUILDING = ("anchor_sizes", "aspect_ratios", "size")
# Plain name -> the name R-CNN constructors use (RetinaNet, FCOS and SSD use the plain names).
RCNN_NAMES = {
    "detections_per_img": "box_detections_per_img",
    "score_thresh": "box_score_thresh",
    "nms_thresh": "box_nms_thresh",
}


# Model name prefix -> the class whose constructor takes the options.
CLASSES = {
    "fasterrcnn": FasterRCNN,
    "maskrcnn": MaskRCNN,
    "keypointrcnn": KeypointRCNN,
    "retinanet": RetinaNet,
    "fcos": FCOS,
    "ssd": SSD,
}
# Constructor arguments detfit's builders set themselves: never options.
SET_BY_BUILDERS = {"self", "backbone", "num_classes", "kwargs", "anchor_generator", "size"}


def constructor_class(name: str) -> type[nn.Module]:
    """The torchvision class whose constructor model ``name`` passes its options to."""
    return next(c for prefix, c in CLASSES.items() if name.startswith(prefix))


def constructor_option_names(name: str, family: str) -> set[str]:
    """The options of model ``name`` (of ``family``: rcnn, dense, ssd) that go to its
    constructor, by the names a setting uses (for R-CNNs the plain and the ``box_`` names)."""
    names = set(inspect.signature(constructor_class(name).__init__).parameters) - SET_BY_BUILDERS
    return names | set(RCNN_NAMES) if family == "rcnn" else names


def constructor_options(name: str, family: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that go to the torchvision constructor of ``family`` (rcnn, dense, ssd), by
    the constructor's names. Which options a model takes is the registry's to decide
    (:meth:`detfit.models.registry.ModelSpec.takes`, checked before any builder runs)."""
    rename = RCNN_NAMES if family == "rcnn" else {}
    return {rename.get(k, k): v for k, v in options.items() if k not in SET_AFTER_BUILDING}


def _nested(values: Any, what: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(values, Sequence) or not all(
        isinstance(v, Sequence) and v and all(isinstance(x, Number) for x in v) for v in values
    ):
        raise DetfitError(f"{what}: one list per feature map, e.g. [[32, 64], [128, 256]]")
    return tuple(tuple(v) for v in values)


def anchor_generator_of(model: nn.Module) -> AnchorGenerator | None:
    rpn = getattr(model, "rpn", None)
    generator = rpn.anchor_generator if rpn is not None else model.anchor_generator
    return generator if isinstance(generator, AnchorGenerator) else None


def set_anchors(model: nn.Module, name: str, sizes: Any, ratios: Any) -> None:
    """New anchor sizes/ratios with the same number per location and per level as the heads."""
    old = anchor_generator_of(model)
    assert old is not None, "the registry refuses anchors for SSD"
    sizes = old.sizes if sizes is None else _nested(sizes, "anchor_sizes")
    if ratios is None:
        ratios = old.aspect_ratios
    elif all(isinstance(r, Number) for r in ratios):
        ratios = (tuple(ratios),) * len(sizes)  # the same ratios on every feature map
    else:
        ratios = _nested(ratios, "aspect_ratios")
    if not len(sizes) == len(ratios) == len(old.sizes):
        raise DetfitError(
            f"{name}: anchor_sizes/aspect_ratios need {len(old.sizes)} lists, one per feature map"
        )
    new = AnchorGenerator(sizes, ratios)
    if new.num_anchors_per_location() != old.num_anchors_per_location():
        raise DetfitError(
            f"{name}: anchors per location {new.num_anchors_per_location()} differ from the "
            f"heads' {old.num_anchors_per_location()} (sizes x ratios per feature map)"
        )
    if hasattr(model, "rpn"):
        model.rpn.anchor_generator = new
    else:
        model.anchor_generator = new


def set_ssd_size(model: SSD, name: str, size: int) -> None:
    """SSDLite's input size (torchvision fixes 320); its default boxes follow the feature maps."""
    if not isinstance(size, int) or size < 32:
        raise DetfitError(f"{name}: size must be an integer >= 32, got {size!r}")
    model.transform.fixed_size = (size, size)
    model.transform.min_size, model.transform.max_size = (size,), size


def apply_post_build(model: nn.Module, name: str, options: dict[str, Any]) -> nn.Module:
    if "anchor_sizes" in options or "aspect_ratios" in options:
        set_anchors(model, name, options.get("anchor_sizes"), options.get("aspect_ratios"))
    if "size" in options:  # SSDLite only (the registry's options)
        set_ssd_size(model, name, options["size"])
    return model
