"""The evaluation loop: run a model over a loader, gather every rank's detections to rank 0,
score them with COCO's metric there, and hand the same numbers to every rank."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from detfit import distributed
from detfit.eval.coco import CocoEvaluator
from detfit.models import iou_types as model_iou_types
from detfit.models.tta import TTA, tta_predict


def as_float_image(image) -> torch.Tensor:
    """The tutorial's loaders may hand uint8 or PIL images; the model wants float in [0, 1]."""
    if not isinstance(image, torch.Tensor):
        from torchvision.transforms.v2 import functional as F

        image = F.pil_to_tensor(image)
    if not image.is_floating_point():
        image = image.float() / 255.0
    return image


class EvaluationResult:
    """What ``evaluate`` returns: per-IoU-type stats (on every rank), and on rank 0 the
    COCOeval objects behind them (pycocotools' or faster-coco-eval's, the same interface).

    ``result.coco_eval["bbox"].stats`` works as with the references' CocoEvaluator.
    """

    def __init__(
        self,
        evaluator: CocoEvaluator,
        stats: dict[str, dict[str, float]],
        per_class: dict[str, dict[str, float]],
        seconds: float,
        num_images: int,
    ) -> None:
        self.evaluator = evaluator
        self.coco_eval = evaluator.coco_eval
        self.stats = stats
        self.per_class = per_class
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
    backend: str | None = None,
    tta: TTA | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> EvaluationResult:
    """COCO evaluation of ``model`` on ``data_loader`` (bbox, and segm/keypoints when the model
    has those heads). Under torchrun each rank passes a loader over its own share of the images
    (:class:`~detfit.data.sampling.ShardBatches`); the result is the single-process one.
    ``backend``: the COCO metric's implementation (``eval_backend``; None: its default).
    ``tta``: score test-time augmented detections (:mod:`detfit.models.tta`).
    ``autocast_dtype``: bf16/fp16 autocast (``models.precision``); None: float32."""
    from detfit.models.precision import autocast

    device = torch.device(device)
    model = distributed.unwrap(model)
    model.eval()
    evaluator = CocoEvaluator(iou_types or model_iou_types(model), classes, backend)
    start = time.perf_counter()
    bar = tqdm(
        data_loader,
        desc="eval",
        disable=not progress or not distributed.is_main(),
        dynamic_ncols=True,
    )
    for images, targets in bar:
        images = [as_float_image(im).to(device) for im in images]
        with autocast(device, autocast_dtype):
            outputs = tta_predict(model, images, tta) if tta is not None else model(images)
        sizes = [tuple(im.shape[-2:]) for im in images]
        evaluator.process(targets, [{k: v.cpu() for k, v in o.items()} for o in outputs], sizes)
    evaluator.gather()
    seconds = time.perf_counter() - start
    stats = evaluator.evaluate(verbose=verbose) if distributed.is_main() else None
    stats, per_class, num_images = distributed.broadcast_from_main(
        (stats, evaluator.per_class, len(evaluator.images))
    )
    return EvaluationResult(evaluator, stats, per_class, seconds, num_images)
