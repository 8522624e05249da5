"""COCO evaluation: ground truth and predictions converted from torchvision's target/output
dicts, gathered as the evaluation loop runs (one pass over the data), scored by the chosen COCOeval
backend (faster-coco-eval or pycocotools, :mod:`detfit.eval.backends`)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from detfit import distributed
from detfit.data.rle import encode_masks
from detfit.eval.backends import metric_backend

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
# pycocotools' keypoint summary has 10 numbers: no small objects (too few pixels for keypoints),
# AR at 20 detections and at OKS 0.50 and 0.75 instead of AR1/AR10/ARs
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def _image_id(target: dict[str, Any]) -> int:
    image_id = target["image_id"]
    return int(image_id.reshape(-1)[0]) if isinstance(image_id, torch.Tensor) else int(image_id)


def _xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = boxes.detach().cpu().to(torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def targets_to_coco(
    image_id: int, target: dict[str, Any], height: int, width: int, first_ann_id: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One image's ground truth as COCO ``images`` and ``annotations`` entries."""
    boxes = target["boxes"]
    xywh = _xyxy_to_xywh(boxes)
    labels = target["labels"].tolist()
    n = len(labels)
    area = target.get("area")
    areas = area.tolist() if area is not None else [w * h for _, _, w, h in xywh]
    iscrowd = target.get("iscrowd")
    crowd = iscrowd.tolist() if iscrowd is not None else [0] * n
    rles = encode_masks(target["masks"]) if "masks" in target and n else [None] * n
    anns = []
    for k in range(n):
        ann = {
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": int(labels[k]),
            "bbox": xywh[k],
            "area": float(areas[k]),
            "iscrowd": int(crowd[k]),
        }
        if rles[k] is not None:
            ann["segmentation"] = rles[k]
        if "keypoints" in target:
            kps = target["keypoints"][k].detach().cpu()
            ann["keypoints"] = kps.reshape(-1).tolist()
            ann["num_keypoints"] = int((kps[:, 2] > 0).sum())
        anns.append(ann)
    return {"id": image_id, "height": int(height), "width": int(width)}, anns


def outputs_to_coco(
    image_id: int, output: dict[str, torch.Tensor], iou_type: str, mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's predictions as COCO results for ``iou_type`` ("bbox" or "segm")."""
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    if iou_type == "bbox":
        geometry = [{"bbox": b} for b in _xyxy_to_xywh(output["boxes"])]
    elif iou_type == "segm":
        if not scores:
            return []
        geometry = [{"segmentation": r} for r in encode_masks(output["masks"] > mask_threshold)]
    elif iou_type == "keypoints":
        keypoints = output["keypoints"].detach().cpu().to(torch.float64)
        geometry = [{"keypoints": k.reshape(-1).tolist()} for k in keypoints]
    else:
        raise ValueError(f"unsupported iou_type {iou_type!r}")
    return [
        {"image_id": image_id, "category_id": int(c), "score": float(s), **g}
        for c, s, g in zip(labels, scores, geometry)
    ]


def oks_sigmas(annotations: Sequence[dict[str, Any]]) -> np.ndarray:
    """COCO's per-keypoint OKS sigmas for the 17 COCO person keypoints; for any other skeleton,
    their mean for every keypoint (pycocotools' default would fail on K != 17)."""
    coco = COCOeval(iouType="keypoints").params.kpt_oks_sigmas
    k = next((len(a["keypoints"]) // 3 for a in annotations if "keypoints" in a), len(coco))
    return coco if k == len(coco) else np.full(k, coco.mean())


class CocoEvaluator:
    """Detectron2-style evaluator: ``reset()``, ``process(targets, outputs)``, ``gather()``,
    ``evaluate()``.

    Ground truth is taken from the targets seen, so no extra pass over the dataset is needed;
    in several processes ``gather()`` concatenates every rank's lists on rank 0, and annotation
    ids are renumbered in image order there, so the result is the one a single process gets.
    """

    def __init__(
        self,
        iou_types: Sequence[str] = ("bbox",),
        classes: Sequence[str] | None = None,
        backend: str | None = None,
    ) -> None:
        self.iou_types = tuple(iou_types)
        self.classes = list(classes) if classes else None
        self.backend = metric_backend(backend)  # None: eval_backend's default
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        self.coco_eval: dict[str, Any] = {}  # COCOeval or COCOeval_faster
        self.per_class: dict[str, dict[str, float]] = {}

    def process(
        self,
        targets: Sequence[dict[str, Any]],
        outputs: Sequence[dict[str, torch.Tensor]],
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        for i, (target, output) in enumerate(zip(targets, outputs)):
            image_id = _image_id(target)
            if image_sizes is not None:
                height, width = image_sizes[i]
            elif "masks" in target:
                height, width = target["masks"].shape[-2:]
            else:
                height = width = 0  # only needed for segm; bbox evaluation ignores it
            image, anns = targets_to_coco(
                image_id, target, height, width, len(self.annotations) + 1
            )
            self.images.append(image)
            self.annotations.extend(anns)
            output = {k: v.detach().cpu() for k, v in output.items()}
            for iou_type in self.iou_types:
                self.results[iou_type].extend(outputs_to_coco(image_id, output, iou_type))

    def gather(self) -> None:
        """Bring every rank's images, annotations and detections to rank 0 (a no-op in one
        process); other ranks are left empty."""
        if distributed.world_size() == 1:
            return
        parts = distributed.gather_to_main((self.images, self.annotations, self.results))
        self.reset()
        for images, anns, results in parts or []:
            self.images.extend(images)
            self.annotations.extend(anns)
            for iou_type in self.iou_types:
                self.results[iou_type].extend(results[iou_type])

    def ground_truth(self) -> dict[str, Any]:
        """The gathered ground truth as a COCO instances dict: images by id, annotations in
        image order numbered 1..N (ranks number their own from 1, so ids would collide)."""
        images = sorted(self.images, key=lambda im: im["id"])
        order = {im["id"]: k for k, im in enumerate(images)}
        annotations = sorted(self.annotations, key=lambda a: order[a["image_id"]])
        annotations = [{**a, "id": k} for k, a in enumerate(annotations, start=1)]
        category_ids = sorted({a["category_id"] for a in annotations})
        if self.classes:
            category_ids = sorted(set(category_ids) | set(range(1, len(self.classes))))
        names = self.classes or []
        categories = [
            {"id": c, "name": names[c] if c < len(names) else str(c)} for c in category_ids
        ]
        return {"images": images, "annotations": annotations, "categories": categories}

    def evaluate(self, verbose: bool = False) -> dict[str, dict[str, float]]:
        """COCO stats per IoU type: ``{"bbox": {"AP": ..., ...12 numbers}, "segm": {...}}``
        (keypoints: the 10 of :data:`KEYPOINT_STAT_NAMES`)."""
        stats = {}
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_gt = self.backend.ground_truth(self.ground_truth())
            for iou_type in self.iou_types:
                sigmas = oks_sigmas(self.annotations) if iou_type == "keypoints" else None
                coco_eval = self.backend.evaluate(coco_gt, self.results[iou_type], iou_type, sigmas)
                self.coco_eval[iou_type] = coco_eval
                names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
                stats[iou_type] = dict(zip(names, map(float, coco_eval.stats), strict=True))
                self.per_class[iou_type] = self._per_class_ap(coco_eval)
        return stats

    def _per_class_ap(self, coco_eval: Any) -> dict[str, float]:
        """AP at IoU 0.50:0.95, all areas, 100 detections, per category (pycocotools' own
        precision table, as its summarize() averages it, the same in both backends); -1 for a
        class without ground truth."""
        precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
        names = self.classes or []
        result = {}
        for k, cat_id in enumerate(coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            name = names[cat_id] if cat_id < len(names) else str(cat_id)
            result[name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        return result
