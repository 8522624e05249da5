"""One evaluation, assembled from a run's settings: the speed-ups and precision the model runs
with, the IoU types it is scored on, the COCO metric's backend and the test-time augmentation.
Training (after every epoch) and ``detfit eval`` both go through here, so a checkpoint is scored
by ``detfit eval`` as its run scored it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from detfit.eval.loop import EvaluationResult, evaluate

if TYPE_CHECKING:
    from detfit.config import TrainConfig
    from detfit.predict.slicing import Slicing


def prepare_model(
    model: nn.Module, cfg: TrainConfig, device: torch.device, log: Callable[[str], None] = print
) -> torch.dtype | None:
    """Apply ``cfg``'s speed-ups to ``model`` (already on ``device``), in place, and return the
    autocast dtype its ``precision`` (or ``amp``) asks for (None: float32); with one, the model's
    coordinate arithmetic is kept in float32 (:mod:`detfit.models.precision`)."""
    from detfit.models.precision import autocast_dtype, keep_fp32_where_needed
    from detfit.models.speedups import speed_up

    speed_up(
        model,
        device,
        fold_frozen_bn=cfg.fold_frozen_bn,
        memory_format=cfg.memory_format,
        sparse_roi_align=cfg.sparse_roi_align,
        compile=cfg.compile,
    )
    dtype = autocast_dtype(cfg.precision, device, amp=cfg.amp, log=log)
    if dtype is not None:
        keep_fp32_where_needed(model)
    return dtype


def evaluate_run(
    model: nn.Module,
    loader: Iterable,
    cfg: TrainConfig,
    device: torch.device,
    *,
    classes: Sequence[str],
    keypoint_names: Sequence[str] | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    tta: bool | None = None,
    slicing: Slicing | None = None,
) -> EvaluationResult:
    """COCO evaluation of ``model`` (prepared by :func:`prepare_model`) on ``loader`` as ``cfg``
    asks: scored on the IoU types its heads give (bbox, segm with masks, keypoints), with the
    ``eval_backend`` metric, and test-time augmentation when ``tta`` (None: the ``tta``
    setting) is on (flips swap ``keypoint_names``' left and right). ``slicing`` scores sliced
    inference (:mod:`detfit.predict.slicing`) with the same metric."""
    from detfit.models import iou_types
    from detfit.models.tta import check_scales_reach, tta_views

    scored = model
    if slicing is not None:
        from detfit.predict.slicing import SlicedModel

        scored = SlicedModel(model, slicing)
    views = tta_views(cfg.tta if tta is None else tta, keypoint_names, cfg.tta_scales)
    check_scales_reach(model, views, cfg.model)
    return evaluate(
        scored,
        loader,
        device,
        iou_types=iou_types(model),
        classes=classes,
        progress=progress,
        verbose=False,
        backend=cfg.eval_backend,
        tta=views,
        autocast_dtype=autocast_dtype,
    )
