"""What a model takes from a run's settings and its data: the model options it is built with
(the recipe's, completed and adapted to the data's sizes, anchors included) and the loss weights
that apply to it. Which option a model takes is its spec's ``options``
(:mod:`detfit.models.registry`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from detfit.errors import DetfitError
from detfit.models.registry import get_spec, options_not_taken, options_refusal

if TYPE_CHECKING:
    from detfit.config import TrainConfig
    from detfit.data.loaders import Datasets

# COCO's metric counts at most 100 detections per image: no cap above it changes AP.
COCO_MAX_DETECTIONS = 100


def options_for_data(
    cfg: TrainConfig, data: Datasets, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The model options, completed by what the data decides.

    - A recipe tuned for one model (the CPU recipe: a Mask R-CNN on detfit's own FPN) stays usable
      with ``--model`` set to another: the recipe's options that model does not take are dropped,
      with one line; the same options set by the user are an error.
    - A recipe's detection cap below twice the most objects in any training image (the CPU
      recipe's 30 suits Penn-Fudan's at most 8 people) is raised to that, at most 100, with one
      line: a cap would otherwise cut recall on crowded images without a word.
    - Keypoint models get ``num_keypoints`` from the data.
    """
    from detfit.config import RECIPES

    options = dict(cfg.model_options)
    spec = get_spec(cfg.model)
    recipe = RECIPES.get(cfg.recipe, {}).get("model_options", {})
    not_taken = options_not_taken(cfg.model, options)
    yours = [k for k in not_taken if k not in recipe or recipe[k] != options[k]]
    if yours:
        raise DetfitError(options_refusal(cfg.model, yours))
    if not_taken:
        log(f"{cfg.model} does not use the {cfg.recipe} recipe's {', '.join(not_taken)}: ignored")
        options = {k: v for k, v in options.items() if k not in not_taken}
    cap_key = next(
        (k for k in ("box_detections_per_img", "detections_per_img") if k in options), None
    )
    adaptable = cap_key and recipe.get(cap_key) == options[cap_key] and cfg.adapt_to_data
    if adaptable and data.max_objects:
        needed = min(2 * data.max_objects, COCO_MAX_DETECTIONS)
        if options[cap_key] < needed:
            log(
                f"{cap_key}: the {cfg.recipe} recipe's {options[cap_key]} raised to {needed} "
                f"(a training image has {data.max_objects} objects)"
            )
            options[cap_key] = needed
    if spec.has_keypoints:
        if not data.keypoint_names:
            raise DetfitError(f"{cfg.dataset}: has no keypoints, and {cfg.model} needs them")
        options.setdefault("num_keypoints", len(data.keypoint_names))
    return options


def loss_weights_for(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, float]:
    """The recipe's loss weights that apply to ``cfg.model``: a box model ignores ``loss_mask``
    (and a model without keypoints ``loss_keypoint``), with one line saying so."""
    spec = get_spec(cfg.model)
    absent = {"loss_mask": not spec.has_masks, "loss_keypoint": not spec.has_keypoints}
    dropped = [k for k in cfg.loss_weights if absent.get(k)]
    if dropped:
        log(f"{cfg.model} computes no {', '.join(dropped)}: ignoring its loss weight")
    return {k: v for k, v in cfg.loss_weights.items() if k not in dropped}


def adapt_to_data(cfg: TrainConfig, data: Datasets, log: Callable[[str], None] = print) -> None:
    """Model options chosen from the training set's sizes (:mod:`detfit.data.adapt`), one line
    each, written into ``cfg`` so that config.yaml records them; the user's own values stay."""
    from detfit.config import RECIPES
    from detfit.data.adapt import adapt_options

    if data.sizes is None or not cfg.adapt_to_data:
        return
    recipe = RECIPES.get(cfg.recipe, {}).get("model_options", {})
    choices = adapt_options(
        dict(cfg.model_options), recipe, data.sizes, not cfg.model.startswith("ssd")
    )
    for choice in choices:
        log(f"adapted to the data: {choice.line()}")
    if choices:
        cfg.model_options = {**cfg.model_options, **{c.key: c.value for c in choices}}


def adapt_anchors_to_data(
    cfg: TrainConfig,
    data: Datasets,
    model: nn.Module,
    options: dict[str, Any],
    log: Callable[[str], None] = print,
) -> None:
    """The built model's anchors scaled to the data's object sizes (:func:`adapt_anchors`), one
    line, recorded in ``options`` (hence the checkpoint's model info) and in ``cfg``. FCOS is
    left alone: its anchors mark each level's size range, not boxes the RPN regresses from."""
    from detfit.data.adapt import adapt_anchors
    from detfit.models.options import anchor_generator_of, set_anchors

    generator = anchor_generator_of(model)
    if generator is None or data.sizes is None or cfg.model.startswith("fcos"):
        return
    if not cfg.adapt_to_data:
        return
    choice = adapt_anchors(generator.sizes, options, data.sizes, not cfg.model.startswith("ssd"))
    if choice is None:
        return
    set_anchors(model, cfg.model, choice.value, None)
    log(f"adapted to the data: {choice.line()}")
    options[choice.key] = choice.value
    cfg.model_options = {**cfg.model_options, choice.key: choice.value}
