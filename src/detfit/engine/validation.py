"""Validation loss: the training losses on the held-out split, without touching the training.

torchvision's detectors return losses only in training mode, and training mode changes state:
BatchNorm layers update their running statistics and the RPN/RoI samplers (and a random
``min_size``) draw from the global RNG. Here BatchNorm layers stay in evaluation mode, every
module's mode is restored afterwards, and the draws come from a forked RNG, so the weights, the
statistics and the training's random stream (hence an exact resume) are what they would have been.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from detfit import distributed
from detfit.engine.step import move_to
from detfit.eval.loop import as_float_image

PER_OBJECT = ("boxes", "labels", "masks", "keypoints", "area", "iscrowd")


def without_crowd(target: dict[str, Any]) -> dict[str, Any]:
    """The target without crowd/difficult regions, as training sees it (evaluation keeps them
    as ignore regions; a loss would treat them as objects)."""
    crowd = target.get("iscrowd")
    if crowd is None or not bool(torch.as_tensor(crowd).any()):
        return target
    keep = torch.as_tensor(crowd) == 0
    return {k: (v[keep] if k in PER_OBJECT else v) for k, v in target.items()}


@torch.no_grad()
def validation_losses(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    loss_weights: dict[str, float] | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean of each loss over ``loader``'s images (every rank passes its share; the result is
    over all of them, on every rank) as ``val_<name>``, and ``val_loss``, their weighted sum as
    training minimises it, computed at the training's precision (``autocast_dtype``)."""
    from detfit.models.precision import autocast

    model = distributed.unwrap(model)
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    sums: dict[str, float] = defaultdict(float)
    count = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for images, targets in loader:
                images, targets = move_to(
                    [as_float_image(im) for im in images], map(without_crowd, targets), device
                )
                with autocast(device, autocast_dtype):
                    losses = model(images, targets)
                for name, value in losses.items():
                    sums[name] += float(value) * len(images)
                count += len(images)
    finally:
        for m, training in modes.items():
            m.training = training
    parts = distributed.all_gather((dict(sums), count))
    n = max(sum(c for _, c in parts), 1)
    means: dict[str, float] = defaultdict(float)
    for part, _ in parts:
        for name, value in part.items():
            means[name] += value / n
    weights = loss_weights or {}
    return {
        "val_loss": sum(v * weights.get(k, 1.0) for k, v in means.items()),
        **{f"val_{k}": v for k, v in means.items()},
    }
