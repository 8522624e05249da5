"""What a request gets back, built by the code ``detfit predict`` writes its files with: the
per-image JSON document (``record``: COCO RLE masks) and the overlay PNG (``overlay``)."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.io import encode_png

from detfit.predict.predictor import Prediction
from detfit.predict.run import overlay, record


def subset(p: Prediction, score_threshold: float, labels: set[int] | None) -> Prediction:
    """The detections a Predictor built with this threshold and these labels would have kept.

    The server's Predictor keeps every detection (threshold 0) so that one model call serves
    requests with different thresholds and classes; cutting its result afterwards is the same
    test (``score >= threshold``, label among ``labels``) on the same numbers, in the same order.
    """
    keep = p.scores >= score_threshold
    if labels is not None:
        keep &= torch.isin(p.labels, torch.tensor(sorted(labels), dtype=p.labels.dtype))
    index = keep.nonzero().flatten().tolist()
    return Prediction(
        boxes=p.boxes[keep],
        labels=p.labels[keep],
        scores=p.scores[keep],
        class_names=[p.class_names[i] for i in index],
        category_ids=[p.category_ids[i] for i in index],
        masks=None if p.masks is None else p.masks[keep],
        keypoints=None if p.keypoints is None else p.keypoints[keep],
        height=p.height,
        width=p.width,
    )


def document(name: str, p: Prediction) -> dict[str, Any]:
    """``detfit predict``'s <name>.json, with the upload's file name as ``image``."""
    return {"image": name, "height": p.height, "width": p.width, "detections": record(p)}


def overlay_png(image: torch.Tensor, p: Prediction) -> bytes:
    """``detfit predict``'s <name>.png: masks, boxes, classes and scores drawn on the image."""
    return encode_png(overlay(image, p)).numpy().tobytes()
