"""What the data asks of a recipe: the resize, and proposal counts for crowded images.

A recipe's numbers were tuned on one dataset (the CPU recipe on Penn-Fudan: images of ~300-500
px, at most 8 people). On 12-megapixel photos its 416 px short side shrinks small objects below
what the first FPN level's anchors (32 px, stride 4) can frame, without a word. From the training
set's own sizes, :func:`adapt_options` chooses, each with a reason:

- the short side (and the long-side cap) so that the median object, resized, is at least
  :data:`FIRST_LEVEL_OBJECT` pixels, up to twice the recipe's sizes (its memory and time);
- RPN proposal counts of at least :data:`PROPOSALS_PER_OBJECT` per object of the most crowded
  image (the detection caps follow the same rule in :func:`detfit.models.policy.options_for_data`);
- anchor sizes (:func:`adapt_anchors`, once the model is built and its own anchors are known)
  halved or doubled, at most twice, when a tenth of the objects, resized, are under half the
  smallest anchor (or over twice the largest): a square object of half an anchor's side overlaps
  it by IoU 0.25 at best, under the RPN's 0.3 background threshold, so no anchor learns it.

Only values the recipe set (or the model's defaults) change: a value the user gave always wins.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from detfit.data.records import AnnotatedSet

FIRST_LEVEL_OBJECT = 32  # pixels: the smallest anchor of torchvision's R-CNN FPNs (P2)
TORCHVISION_SIZES = {"min_size": 800, "max_size": 1333}  # GeneralizedRCNNTransform's defaults
MAX_GROWTH = 2.0  # the resize may at most double the recipe's sizes
PROPOSALS_PER_OBJECT = 5
PROPOSAL_KEYS = ("rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test")
MAX_ANCHOR_SHIFT = 2  # anchors are scaled by at most 2**2 either way


@dataclass(frozen=True)
class DataSizes:
    """Medians of the training images' sides and of their objects' sqrt(box area), in pixels."""

    short_side: float
    long_side: float
    object_size: float
    max_objects: int
    small_object: float | None = None  # the 10th percentile of sqrt(box area)
    large_object: float | None = None  # the 90th percentile


def data_sizes(annotations: AnnotatedSet) -> DataSizes | None:
    """The sizes of ``annotations`` (image sides from the file, else the image header); None
    when it has no boxed objects."""
    from detfit.data.images import read_header

    shorts, longs, objects = [], [], []
    for record in annotations.images:
        width, height = record.width, record.height
        if not (width and height):
            header = read_header(record.path)
            width, height = header.width, header.height
        shorts.append(min(width, height))
        longs.append(max(width, height))
        for inst in record.instances:
            if inst.box is not None and not inst.crowd:
                x1, y1, x2, y2 = inst.box
                objects.append(math.sqrt(max(x2 - x1, 0) * max(y2 - y1, 0)))
    if not objects:
        return None
    most = max(len(r.instances) for r in annotations.images)
    deciles = statistics.quantiles(objects, n=10) if len(objects) > 1 else objects * 9
    return DataSizes(
        statistics.median(shorts),
        statistics.median(longs),
        statistics.median(objects),
        most,
        small_object=deciles[0],
        large_object=deciles[-1],
    )


@dataclass(frozen=True)
class Choice:
    key: str  # a model option
    value: Any
    why: str

    def line(self) -> str:
        return f"model_options.{self.key}: {self.value} ({self.why})"


def adapt_options(
    options: dict[str, Any], recipe: dict[str, Any], sizes: DataSizes, takes_min_size: bool
) -> list[Choice]:
    """The choices for model ``options`` (the recipe's ``recipe`` options merged with the
    user's) on data of ``sizes``; ``takes_min_size``: the model resizes by min_size/max_size."""

    def adaptable(key: str) -> bool:  # the user did not set it
        return key not in options or (key in recipe and recipe[key] == options[key])

    choices = []
    if takes_min_size and adaptable("min_size") and adaptable("max_size"):
        choices += _resize(options, sizes)
    for key in PROPOSAL_KEYS:
        needed = min(PROPOSALS_PER_OBJECT * sizes.max_objects, 2000)
        if key in options and adaptable(key) and options[key] < needed:
            why = f"{options[key]} is too few for an image of {sizes.max_objects} objects"
            choices.append(Choice(key, needed, why))
    return choices


def eval_scale(options: dict[str, Any], sizes: DataSizes) -> tuple[float, int]:
    """How the model resizes the median image when it evaluates (torchvision evaluates at the
    last ``min_size``), and that short side."""
    min_size = options.get("min_size", TORCHVISION_SIZES["min_size"])
    max_size = options.get("max_size", TORCHVISION_SIZES["max_size"])
    evaluated = min_size[-1] if isinstance(min_size, list) else min_size  # torchvision's rule
    return min(evaluated / sizes.short_side, max_size / sizes.long_side), evaluated


def adapt_anchors(
    anchor_sizes: tuple[tuple[float, ...], ...],
    options: dict[str, Any],
    sizes: DataSizes,
    takes_min_size: bool,
) -> Choice | None:
    """New ``anchor_sizes`` for a model whose own are ``anchor_sizes`` (one tuple per feature
    map), resizing with ``options``, on data of ``sizes``; None when they suit the data or the
    user (or the recipe) set them."""
    if "anchor_sizes" in options or sizes.small_object is None or sizes.large_object is None:
        return None
    scale = eval_scale(options, sizes)[0] if takes_min_size else 1.0
    small, large = sizes.small_object * scale, sizes.large_object * scale
    lowest = min(min(level) for level in anchor_sizes)
    highest = max(max(level) for level in anchor_sizes)
    if 0 < small < lowest / 2:
        shift = -min(math.ceil(math.log2(lowest / (2 * small))), MAX_ANCHOR_SHIFT)
        why = (
            f"a tenth of the objects are {small:.0f} px or less once resized, under half the "
            f"smallest anchor ({lowest:g} px): no anchor would overlap them by IoU 0.3"
        )
    elif large > 2 * highest:
        shift = min(math.ceil(math.log2(large / (2 * highest))), MAX_ANCHOR_SHIFT)
        why = (
            f"a tenth of the objects are {large:.0f} px or more once resized, over twice the "
            f"largest anchor ({highest:g} px)"
        )
    else:
        return None
    factor = 2.0**shift

    def scaled(size: float) -> int | float:
        value = size * factor
        return int(value) if float(value).is_integer() else round(value, 2)

    value = [[scaled(size) for size in level] for level in anchor_sizes]
    return Choice("anchor_sizes", value, f"{why}; x{factor:g}")


def _resize(options: dict[str, Any], sizes: DataSizes) -> list[Choice]:
    min_size = options.get("min_size", TORCHVISION_SIZES["min_size"])
    max_size = options.get("max_size", TORCHVISION_SIZES["max_size"])
    scale, evaluated = eval_scale(options, sizes)
    resized = sizes.object_size * scale
    if resized >= FIRST_LEVEL_OBJECT:
        return []
    growth = min(FIRST_LEVEL_OBJECT / resized, MAX_GROWTH)

    def grown(value: int) -> int:
        return int(math.ceil(value * growth / 32) * 32)

    new_min = [grown(v) for v in min_size] if isinstance(min_size, list) else grown(min_size)
    new_max = grown(max_size)
    after = sizes.object_size * min(
        (new_min[-1] if isinstance(new_min, list) else new_min) / sizes.short_side,
        new_max / sizes.long_side,
    )
    capped = ", at most twice the recipe's sizes" if growth == MAX_GROWTH else ""
    why = (
        f"the median object, {sizes.object_size:.0f} px in {sizes.short_side:.0f} x "
        f"{sizes.long_side:.0f} px images, would be {resized:.0f} px at {evaluated}; "
        f"{after:.0f} px now, the first FPN level's anchors being {FIRST_LEVEL_OBJECT} px{capped}"
    )
    return [Choice("min_size", new_min, why), Choice("max_size", new_max, "with min_size")]


def recipe_report(annotations: AnnotatedSet) -> list[str]:
    """What each recipe would adapt to ``annotations`` (``detfit data check``), one line each."""
    from detfit.config import RECIPES, recipe_config

    sizes = data_sizes(annotations)
    if sizes is None:
        return []
    lines = [
        f"sizes: median image {sizes.short_side:.0f} x {sizes.long_side:.0f} px, median object "
        f"{sizes.object_size:.0f} px, at most {sizes.max_objects} objects in an image"
    ]
    for name in RECIPES:
        cfg = recipe_config(name)
        recipe = RECIPES[name].get("model_options", {})
        resizes = not cfg.model.startswith("ssd")
        choices = adapt_options(dict(cfg.model_options), recipe, sizes, resizes)
        options = {**cfg.model_options, **{c.key: c.value for c in choices}}
        anchors = _anchors_of(cfg.model, options)
        anchor_choice = anchors and adapt_anchors(anchors, options, sizes, resizes)
        choices += [anchor_choice] if anchor_choice else []
        if not choices:
            lines.append(f"recipe {name}: its sizes, anchors and proposal counts suit this data")
        lines += [f"recipe {name} would choose {c.line()}" for c in choices]
    return lines


def _anchors_of(name: str, options: dict[str, Any]) -> tuple[tuple[float, ...], ...] | None:
    """The anchor sizes model ``name`` has with ``options`` (built without weights: only its
    anchor generator is read); None for models whose anchors are not adapted (SSD, FCOS)."""
    from detfit.models import build_model
    from detfit.models.options import anchor_generator_of

    if name.startswith(("ssd", "fcos")):
        return None
    model = build_model(name, 2, weights=None, weights_backbone=None, **options)
    generator = anchor_generator_of(model)
    return generator.sizes if generator is not None else None
