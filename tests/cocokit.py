"""pycocotools run directly on a model's own detections: the reference a trained model's
recorded metrics must equal.

A test of a trained model that only checks ``0 <= AP <= 1`` passes whatever the training, the
checkpoint or the metric did. These helpers score the same weights on the same images without
detfit's evaluation code (no CocoEvaluator, no results conversion, no per-class table): ground
truth and detections are written as COCO dicts here, and pycocotools' COCOeval computes every
number, per class with ``params.catIds = [c]``. A checkpoint saved with other weights than the
ones evaluated, a class mapped to the wrong name, a run whose test split differs from what it
recorded, or an evaluation that scores something else all change the numbers compared.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

BOX_STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
KEYPOINT_STATS = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
# COCO's person-keypoint OKS sigmas; a skeleton of K != 17 points gets their mean for each point
# (pycocotools itself only knows the 17), the rule detfit documents for keypoint evaluation.
COCO_SIGMAS = np.array(
    [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]
) / 10.0  # fmt: skip


def _float_image(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255.0 if not image.is_floating_point() else image.float()


def _ground_truth(samples: Sequence[tuple[torch.Tensor, dict]], classes: Sequence[str]) -> dict:
    images, annotations = [], []
    for image_id, (image, target) in enumerate(samples, start=1):
        height, width = image.shape[-2:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        boxes = target["boxes"].tolist()
        areas = target["area"].tolist() if "area" in target else None
        crowd = target["iscrowd"].tolist() if "iscrowd" in target else [0] * len(boxes)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            ann: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(target["labels"][k]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": areas[k] if areas is not None else (x1 - x0) * (y1 - y0),
                "iscrowd": int(crowd[k]),
            }
            if "masks" in target:
                rle = mask_util.encode(
                    np.asfortranarray(target["masks"][k].numpy().astype(np.uint8))
                )
                ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            if "keypoints" in target:
                points = target["keypoints"][k].tolist()
                ann["keypoints"] = [v for point in points for v in point]
                ann["num_keypoints"] = sum(1 for point in points if point[2] > 0)
            annotations.append(ann)
    categories = [{"id": c, "name": name} for c, name in enumerate(classes) if c > 0]
    return {"images": images, "annotations": annotations, "categories": categories}


def _detections(outputs: Sequence[dict], iou_type: str) -> list[dict]:
    results = []
    for image_id, out in enumerate(outputs, start=1):
        for k in range(len(out["scores"])):
            record: dict[str, Any] = {
                "image_id": image_id,
                "category_id": int(out["labels"][k]),
                "score": float(out["scores"][k]),
            }
            if iou_type == "bbox":
                x0, y0, x1, y1 = out["boxes"][k].tolist()
                record["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            elif iou_type == "segm":
                binary = (out["masks"][k, 0] > 0.5).numpy().astype(np.uint8)
                rle = mask_util.encode(np.asfortranarray(binary))
                record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                record["keypoints"] = out["keypoints"][k].double().reshape(-1).tolist()
            results.append(record)
    return results


def _cocoeval(gt: COCO, results: list[dict], iou_type: str, category: int | None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            # loadRes adds area, id and (for masks) a bbox to the records it gets: a copy
            dt = gt.loadRes(copy.deepcopy(results))
        else:  # loadRes refuses an empty list: nothing detected, on the same images
            dt = COCO()
            dt.dataset = {**gt.dataset, "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iou_type)
        if iou_type == "keypoints":
            k = len(gt.dataset["annotations"][0]["keypoints"]) // 3
            evaluator.params.kpt_oks_sigmas = (
                COCO_SIGMAS if k == 17 else np.full(k, COCO_SIGMAS.mean())
            )
        if category is not None:
            evaluator.params.catIds = [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def pycocotools_scores(
    outputs: Sequence[dict],
    samples: Sequence[tuple[torch.Tensor, dict]],
    iou_types: Sequence[str],
    classes: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Per IoU type, COCOeval's numbers for ``outputs`` (one per sample, in order) against the
    samples' targets, named as ``detfit eval --json`` names them, and ``AP/<class>`` (-1 for a
    class without ground truth)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = _ground_truth(samples, classes)
        gt.createIndex()
    present = {a["category_id"] for a in gt.dataset["annotations"]}
    report: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        results = _detections(outputs, iou_type)
        names = KEYPOINT_STATS if iou_type == "keypoints" else BOX_STATS
        stats = dict(zip(names, map(float, _cocoeval(gt, results, iou_type, None))))
        for c, name in enumerate(classes):
            if c > 0:
                ap = _cocoeval(gt, results, iou_type, c)[0] if c in present else -1.0
                stats[f"AP/{name}"] = float(ap)
        report[iou_type] = stats
    return report


@torch.no_grad()
def run_model(model: torch.nn.Module, images: Sequence[torch.Tensor], **kwargs) -> list[dict]:
    """``model`` on each image alone (detfit evaluates in batches of one), on the CPU; kwargs
    go to :func:`detfit.models.tta.tta_predict` when ``tta`` is given."""
    model.eval()
    tta = kwargs.pop("tta", None)
    dtype = kwargs.pop("autocast_dtype", None)
    outputs = []
    for image in images:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            if tta is not None:
                from detfit.models.tta import tta_predict

                (out,) = tta_predict(model, [_float_image(image)], tta)
            else:
                (out,) = model([_float_image(image)])
        outputs.append({k: v.float() if v.is_floating_point() else v for k, v in out.items()})
    return outputs


def reference_scores(
    checkpoint: str | Path, *, data: str | None = None, tta: Any = None
) -> dict[str, dict[str, float]]:
    """pycocotools on ``checkpoint``'s detections of the images ``detfit eval`` scores (its
    run's test split, or every image of ``data``), with the speed-ups and precision the run
    evaluates with. ``tta``: a :class:`detfit.models.tta.TTA` to run instead of one view."""
    from detfit.checkpoint import load_model
    from detfit.config import TrainConfig
    from detfit.data.loaders import build_datasets
    from detfit.eval.assembly import prepare_model
    from detfit.models import iou_types

    loaded = load_model(checkpoint, "cpu")
    cfg = TrainConfig.from_dict(loaded.config, str(checkpoint))
    if data:
        cfg.dataset = data
    datasets = build_datasets(cfg, log=lambda line: None, held_out="all" if data else "test")
    dtype = prepare_model(loaded.model, cfg, torch.device("cpu"), log=lambda line: None)
    samples = [datasets.test[i] for i in range(len(datasets.test))]
    outputs = run_model(loaded.model, [s[0] for s in samples], tta=tta, autocast_dtype=dtype)
    return pycocotools_scores(outputs, samples, iou_types(loaded.model), datasets.classes)


def row_scores(row: dict[str, float], iou_type: str) -> dict[str, float]:
    """A metrics.json row's numbers for ``iou_type``, named without the ``<type>_`` prefix."""
    prefix = f"{iou_type}_"
    return {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}


def assert_scores_equal(recorded: dict[str, float], reference: dict[str, float]) -> None:
    """Every number pycocotools computed is the one recorded (to float printing precision)."""
    missing = set(reference) - set(recorded)
    assert not missing, f"not recorded: {sorted(missing)}"
    for name, value in reference.items():
        assert recorded[name] == pytest.approx(value, abs=1e-9), (name, recorded[name], value)


def pseudo_ground_truth(checkpoint: str | Path, files: Sequence[Path], path: Path) -> Path:
    """A COCO file whose objects are ``checkpoint``'s own top three detections per image (those
    with a non-empty mask), moved by a pixel: scored against it, even a barely trained model has
    an AP well above 0 and below 1, so a number that changes when anything in between does."""
    from detfit.predict import Predictor

    predictor = Predictor(checkpoint, device="cpu", score_threshold=0.0)
    classes = predictor.classes
    data: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    data["categories"] = [{"id": c, "name": name} for c, name in enumerate(classes) if c > 0]
    for image_id, file in enumerate(files, start=1):
        p = predictor(file)
        height, width = p.masks.shape[-2:]
        data["images"].append(
            {
                "id": image_id,
                "file_name": str(Path(file).resolve()),
                "height": height,
                "width": width,
            }
        )
        for k in [k for k in range(len(p)) if p.masks[k].any()][:3]:
            x0, y0, x1, y1 = p.boxes[k].tolist()
            mask = p.masks[k].roll(1, dims=-1).numpy().astype(np.uint8)
            rle = mask_util.encode(np.asfortranarray(mask))
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(p.labels[k]),
                    "bbox": [x0 + 1, y0, x1 - x0, y1 - y0],
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                }
            )
    assert data["annotations"], f"{checkpoint} detects nothing with a mask"
    path.write_text(json.dumps(data))
    return path
