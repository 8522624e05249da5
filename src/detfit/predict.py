"""Prediction from a checkpoint: overlays drawn with torchvision.utils and one JSON per image."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from detfit.data.images import load_rgb
from detfit.data.rle import encode_masks
from detfit.distributed import resolve_device
from detfit.engine.checkpoint import load_checkpoint
from detfit.errors import DetfitError
from detfit.fileio import atomic_write, atomic_write_text
from detfit.models import rebuild_model


def load_model(checkpoint: str | Path, device: str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model in eval mode on ``device``, and its model_info (classes, options)."""
    ckpt = load_checkpoint(checkpoint)
    model = rebuild_model(ckpt["model_info"], ckpt["model"])
    model.to(resolve_device(device)).eval()
    return model, ckpt["model_info"]


def class_name(classes: Sequence[str] | None, label: int) -> str:
    return classes[label] if classes and 0 <= label < len(classes) else str(label)


@torch.inference_mode()
def predict_image(
    model: nn.Module, image: torch.Tensor, score_threshold: float = 0.5
) -> dict[str, torch.Tensor]:
    """Detections above ``score_threshold`` for one uint8 image, on the CPU."""
    device = next(model.parameters()).device
    output = model([image.to(device).float() / 255.0])[0]
    keep = output["scores"] >= score_threshold
    return {k: v[keep].cpu() for k, v in output.items()}


def draw_prediction(
    image: torch.Tensor,
    prediction: dict[str, torch.Tensor],
    classes: Sequence[str] | None = None,
    mask_threshold: float = 0.5,
) -> torch.Tensor:
    """The image with masks, boxes, class names and scores drawn (uint8 [3,H,W])."""
    out = image
    if "masks" in prediction and len(prediction["masks"]):
        masks = prediction["masks"][:, 0] > mask_threshold
        out = draw_segmentation_masks(out, masks, alpha=0.45)
    if len(prediction["boxes"]):
        labels = [
            f"{class_name(classes, int(c))} {s:.2f}"
            for c, s in zip(prediction["labels"].tolist(), prediction["scores"].tolist())
        ]
        width = max(1, round(max(image.shape[-2:]) / 300))
        out = draw_bounding_boxes(
            out, prediction["boxes"], labels=labels, width=width, colors="red"
        )
    return out


def prediction_record(
    path: Path,
    image: torch.Tensor,
    prediction: dict[str, torch.Tensor],
    classes: Sequence[str] | None,
    mask_threshold: float = 0.5,
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """JSON-ready detections: class, score, xyxy box, and the mask as COCO RLE.

    ``category_id`` is the id of the training data's own file (COCO ids need not be 1..K)."""
    rles = encode_masks(prediction["masks"] > mask_threshold) if "masks" in prediction else []
    detections = []
    for k, (label, score, box) in enumerate(
        zip(
            prediction["labels"].tolist(),
            prediction["scores"].tolist(),
            prediction["boxes"].tolist(),
        )
    ):
        det = {
            "label": label,
            "class": class_name(classes, label),
            "category_id": category_ids[label] if category_ids else label,
            "score": round(score, 4),
            "box_xyxy": [round(v, 2) for v in box],
        }
        if rles:
            det["mask_rle"] = rles[k]
        if "keypoints" in prediction:
            det["keypoints"] = [
                round(v, 2) for v in prediction["keypoints"][k].reshape(-1).tolist()
            ]
        detections.append(det)
    return {
        "image": str(path),
        "height": image.shape[-2],
        "width": image.shape[-1],
        "detections": detections,
    }


def predict_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float = 0.5,
    device: str = "auto",
) -> list[Path]:
    """Predict every image; write ``<stem>.png`` (overlay) and ``<stem>.json`` into ``out_dir``.

    All images are decoded before anything is written, so a bad file stops the run cleanly.
    """
    paths = [Path(p) for p in images]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise DetfitError(f"two input images are named {dup!r}: their outputs would collide")
    decoded = [load_rgb(p) for p in paths]
    model, info = load_model(checkpoint, device)
    classes = info.get("classes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, image in zip(paths, decoded):
        prediction = predict_image(model, image, score_threshold)
        overlay = draw_prediction(image, prediction, classes)
        png = encode_png(overlay).numpy().tobytes()
        atomic_write(out_dir / f"{path.stem}.png", lambda f, data=png: f.write(data))
        record = prediction_record(
            path, image, prediction, classes, category_ids=info.get("category_ids")
        )
        atomic_write_text(out_dir / f"{path.stem}.json", json.dumps(record, indent=2))
        written += [out_dir / f"{path.stem}.png", out_dir / f"{path.stem}.json"]
    return written
