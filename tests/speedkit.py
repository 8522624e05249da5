"""A tiny Mask R-CNN checkpoint whose own test split is labelled with its float32 detections, for
the reduced-precision tests (bf16 autocast, int8 ONNX): the float32 model then scores AP near 1
on that split, so a lower-precision run's AP says how far its detections moved (a tiny model
scores ~0 on real labels, and zeros would agree trivially)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import SMALL
from detfit.checkpoint import load_checkpoint, rebuild_model
from detfit.config import TrainConfig
from detfit.data.images import load_rgb
from detfit.data.rle import encode_masks
from exportkit import tiny_checkpoint, write_images

MODEL = "maskrcnn_mobilenet_v2_fpn"
# a handful of confident detections per image: the pseudo ground truth
OPTIONS = {**SMALL, "box_detections_per_img": 5}
SIZES = [(70, 90), (100, 60), (50, 120), (96, 128), (80, 80), (64, 100)]
KEPT = 3  # top detections per image taken as ground truth


def pseudo_labelled_checkpoint(folder: Path, seed: int = 1) -> Path:
    """``folder/model.pt``: a random, spread-out tiny Mask R-CNN whose config's dataset is a COCO
    file of ``SIZES`` images labelled with its own top float32 detections (classes cat, dog)."""
    images = write_images(folder / "images", SIZES)
    draft = tiny_checkpoint(folder / "draft.pt", MODEL, OPTIONS, seed=seed)
    ckpt = load_checkpoint(draft)
    model = rebuild_model(ckpt["model_info"], ckpt["model"]).eval()
    coco = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    for image_id, path in enumerate(images, 1):
        image = load_rgb(path)
        with torch.no_grad():
            out = model([image.float() / 255])[0]
        height, width = image.shape[-2:]
        coco["images"].append(
            {"id": image_id, "file_name": path.name, "height": height, "width": width}
        )
        masks = out["masks"][:KEPT, 0] > 0.5
        for box, label, rle in zip(
            out["boxes"][:KEPT].tolist(), out["labels"][:KEPT].tolist(), encode_masks(masks)
        ):
            x1, y1, x2, y2 = box
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 16 + label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": rle,
                    "area": float((x2 - x1) * (y2 - y1)),
                    "iscrowd": 0,
                }
            )
    labels = folder / "labels.json"
    labels.write_text(json.dumps(coco))
    cfg = TrainConfig(
        model=MODEL,
        weights=None,
        weights_backbone=None,
        model_options=OPTIONS,
        dataset=f"coco:{labels},images={folder / 'images'}",
        num_test=4,
        workers=0,
        threads=1,
        eval_batch_size=2,
    )
    return tiny_checkpoint(folder / "model.pt", MODEL, OPTIONS, cfg.to_dict(), seed=seed)
