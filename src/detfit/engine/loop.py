"""``train_one_epoch`` and ``evaluate`` with the signatures of torchvision's references, so the
tutorial's main runs unchanged; detfit's trainer calls the same two functions."""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from detfit.errors import DetfitError
from detfit.eval.coco import CocoEvaluator

MAX_NONFINITE_STEPS = 5  # consecutive NaN/inf losses before training stops


def move_to(images, targets, device: torch.device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in t.items()
        }
        for t in targets
    ]
    return images, targets


def _as_float_image(image):
    """The tutorial's loaders may hand uint8 or PIL images; the model wants float in [0, 1]."""
    if not isinstance(image, torch.Tensor):
        from torchvision.transforms.v2 import functional as F

        image = F.pil_to_tensor(image)
    if not image.is_floating_point():
        image = image.float() / 255.0
    return image


def reference_warmup(optimizer, data_loader) -> torch.optim.lr_scheduler.LRScheduler:
    """The references' first-epoch warm-up: linear from 0.001x over min(1000, len-1) iterations."""
    warmup_iters = max(1, min(1000, len(data_loader) - 1))
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=0.001, total_iters=warmup_iters
    )


def _step_schedule(lr_scheduler: Any) -> None:
    """Advance the per-iteration schedule even when no optimizer step was taken.

    A skipped step (non-finite loss, or AMP's GradScaler after an overflow, typically on the
    first steps) makes torch warn that the scheduler ran first; here that is intended.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
        lr_scheduler.step()


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device | str,
    epoch: int,
    print_freq: int = 10,
    scaler: torch.amp.GradScaler | None = None,
    *,
    lr_scheduler: Any = "reference",
    clip_grad_norm: float | None = None,
    max_iters: int | None = None,
    progress: bool = True,
    ema: Any = None,
    loss_weights: dict[str, float] | None = None,
) -> dict[str, float]:
    """One pass over ``data_loader``; returns the mean of each loss and seconds per iteration.

    ``lr_scheduler`` is stepped every iteration. The default, ``"reference"``, reproduces the
    references: a linear warm-up during epoch 0 only. ``max_iters`` cuts the epoch short (smoke
    runs). ``ema`` (an ``AveragedModel``) is updated after every step. Non-finite losses skip
    the step; several in a row stop training with a message instead of training on NaN.
    ``loss_weights`` scales named losses (e.g. ``{"loss_mask": 2.0}``); the others count once.
    """
    device = torch.device(device)
    weights = loss_weights or {}
    model.train()
    if lr_scheduler == "reference":
        lr_scheduler = reference_warmup(optimizer, data_loader) if epoch == 0 else None
    sums: dict[str, float] = defaultdict(float)
    steps = nonfinite = skipped = 0
    total = 0.0
    start = time.perf_counter()
    bar = tqdm(
        data_loader,
        desc=f"epoch {epoch}",
        disable=not progress,
        dynamic_ncols=True,
        miniters=max(1, print_freq // 5),
        leave=True,
    )
    for i, (images, targets) in enumerate(bar):
        if max_iters is not None and i >= max_iters:
            break
        images, targets = move_to([_as_float_image(im) for im in images], targets, device)
        with torch.autocast(device_type=device.type, enabled=scaler is not None):
            loss_dict = model(images, targets)
            unknown = set(weights) - set(loss_dict)
            if unknown:
                raise DetfitError(
                    f"loss_weights: {', '.join(sorted(unknown))} not among this model's losses "
                    f"({', '.join(loss_dict)})"
                )
            loss = sum(v * weights.get(k, 1.0) for k, v in loss_dict.items())
        if not math.isfinite(loss.item()):
            nonfinite += 1
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            if nonfinite >= MAX_NONFINITE_STEPS:
                raise DetfitError(
                    f"loss is {loss.item()} for {nonfinite} iterations in a row (epoch {epoch}, "
                    f"iteration {i}): lower the learning rate or set clip_grad_norm"
                )
            if lr_scheduler is not None:  # keep the per-iteration schedule on the clock
                _step_schedule(lr_scheduler)
            continue
        nonfinite = 0
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        if lr_scheduler is not None:
            _step_schedule(lr_scheduler)
        steps += 1
        for k, v in loss_dict.items():
            sums[k] += v.item()
        total += loss.item()
        if i % max(1, print_freq // 5) == 0 or i == len(bar) - 1:
            bar.set_postfix(
                loss=f"{total / steps:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}"
            )
    bar.close()
    elapsed = time.perf_counter() - start
    result = {k: v / max(steps, 1) for k, v in sums.items()}
    result.update(
        loss=total / max(steps, 1),
        lr=optimizer.param_groups[0]["lr"],
        seconds=elapsed,
        seconds_per_iter=elapsed / max(steps + skipped, 1),
        skipped_steps=float(skipped),
    )
    return result


def iou_types_for(model: nn.Module) -> list[str]:
    """bbox always; segm for mask models; keypoints for keypoint models."""
    heads = getattr(model, "roi_heads", None)
    types = ["bbox"]
    if heads is not None and getattr(heads, "mask_predictor", None) is not None:
        types.append("segm")
    if heads is not None and getattr(heads, "keypoint_predictor", None) is not None:
        types.append("keypoints")
    return types


class EvaluationResult:
    """What ``evaluate`` returns: per-IoU-type stats, and the pycocotools objects behind them.

    ``result.coco_eval["bbox"].stats`` works as with the references' CocoEvaluator.
    """

    def __init__(
        self,
        evaluator: CocoEvaluator,
        stats: dict[str, dict[str, float]],
        seconds: float,
        num_images: int,
    ) -> None:
        self.evaluator = evaluator
        self.coco_eval = evaluator.coco_eval
        self.stats = stats
        self.per_class = evaluator.per_class
        self.seconds = seconds
        self.num_images = num_images

    def __repr__(self) -> str:
        parts = [f"{t} AP {s['AP']:.3f}" for t, s in self.stats.items()]
        return f"EvaluationResult({', '.join(parts)}, {self.num_images} images)"


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    device: torch.device | str,
    *,
    iou_types: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> EvaluationResult:
    """COCO evaluation of ``model`` on ``data_loader`` (bbox, and segm for mask models)."""
    device = torch.device(device)
    model.eval()
    evaluator = CocoEvaluator(iou_types or iou_types_for(model), classes=classes)
    start = time.perf_counter()
    n = 0
    for images, targets in tqdm(data_loader, desc="eval", disable=not progress, dynamic_ncols=True):
        images = [_as_float_image(im).to(device) for im in images]
        outputs = model(images)
        sizes = [tuple(im.shape[-2:]) for im in images]
        evaluator.process(targets, [{k: v.cpu() for k, v in o.items()} for o in outputs], sizes)
        n += len(images)
    seconds = time.perf_counter() - start
    stats = evaluator.evaluate(verbose=verbose)  # verbose: pycocotools' summary
    return EvaluationResult(evaluator, stats, seconds, n)
