"""A detection confusion matrix: which class each ground-truth object was detected as, at IoU 0.5.

COCO's metric says how good the ranking is; this says what the errors are (a cat called a dog,
a missed person, a detection on nothing). It reads the same COCO-format ground truth and
detections that :class:`~detfit.eval.coco.CocoEvaluator` scores.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from detfit.predict.defaults import DEFAULT_SCORE_THRESHOLD

IOU_THRESHOLD = 0.5


def _xyxy(anns: Sequence[dict[str, Any]]) -> torch.Tensor:
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _match(iou: np.ndarray, allowed: np.ndarray, gt_free: np.ndarray, dt_free: np.ndarray):
    """Greedy one-to-one matching, highest IoU first, among ``allowed`` free pairs."""
    pairs = np.argwhere(allowed & gt_free[:, None] & dt_free[None, :])
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    for g, d in pairs[order]:
        if gt_free[g] and dt_free[d]:
            gt_free[g] = dt_free[d] = False
            yield int(g), int(d)


def confusion_matrix(
    ground_truth: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    num_classes: int,
    *,
    iou_threshold: float = IOU_THRESHOLD,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> np.ndarray:
    """Counts [num_classes, num_classes]: row = ground-truth label, column = predicted label,
    label 0 = background. Row 0 counts detections on no object (false positives), column 0
    objects nobody detected (misses).

    ``ground_truth`` is a COCO instances dict and ``detections`` COCO results (xywh boxes), both
    with contiguous labels as category ids. Detections scoring below ``score_threshold`` (what
    ``detfit predict`` would not draw) are left out. Per image, detections are matched one to
    one to objects at IoU >= ``iou_threshold``: first to objects of their own class, then to any
    remaining object (a confusion). A detection left over on a crowd region (intersection over
    its own area >= the threshold, as COCO) is ignored.
    """
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    gts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in ground_truth["annotations"]:
        gts[ann["image_id"]].append(ann)
    dts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for det in detections:
        if det["score"] >= score_threshold:
            dts[det["image_id"]].append(det)
    for image in ground_truth["images"]:
        objects = [a for a in gts[image["id"]] if not a.get("iscrowd")]
        crowd = [a for a in gts[image["id"]] if a.get("iscrowd")]
        found = dts[image["id"]]
        gt_labels = np.array([a["category_id"] for a in objects], dtype=np.int64)
        dt_labels = np.array([d["category_id"] for d in found], dtype=np.int64)
        iou = box_iou(_xyxy(objects), _xyxy(found)).numpy()
        close = iou >= iou_threshold
        gt_free = np.ones(len(objects), bool)
        dt_free = np.ones(len(found), bool)
        same = gt_labels[:, None] == dt_labels[None, :]
        for allowed in (close & same, close):
            for g, d in _match(iou, allowed, gt_free, dt_free):
                matrix[gt_labels[g], dt_labels[d]] += 1
        np.add.at(matrix, (gt_labels[gt_free], 0), 1)
        left = np.flatnonzero(dt_free)
        if crowd and len(left):
            on_crowd = _covered(_xyxy([found[d] for d in left]), _xyxy(crowd)) >= iou_threshold
            left = left[~on_crowd]
        np.add.at(matrix, (0, dt_labels[left]), 1)
    return matrix


def best_f1_threshold(
    ground_truth: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    *,
    iou_threshold: float = IOU_THRESHOLD,
    default: float = DEFAULT_SCORE_THRESHOLD,
) -> float:
    """The score from which the detections reach their best F1 at IoU ``iou_threshold``: the
    threshold at which to look at a model's errors (a fixed 0.5 shows nothing of a young model
    whose scores stay below it, and hides little of a confident one). Each detection, highest
    score first, takes the unmatched object of its class it overlaps most, as COCO matches;
    one left over on a crowd region is ignored. ``default`` when there is nothing to match."""
    objects: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    crowd: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in ground_truth["annotations"]:
        if ann.get("iscrowd"):
            crowd[ann["image_id"]].append(ann)
        else:
            objects[ann["image_id"], ann["category_id"]].append(ann)
    found: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for det in detections:
        found[det["image_id"], det["category_id"]].append(det)
    scores, hits = [], []
    for key, dets in found.items():
        dets = sorted(dets, key=lambda d: -d["score"])
        iou = box_iou(_xyxy(dets), _xyxy(objects[key])).numpy()
        free = np.ones(iou.shape[1], bool)
        regions = _xyxy(crowd[key[0]])
        for d, det in enumerate(dets):
            candidates = np.where(free & (iou[d] >= iou_threshold), iou[d], -1.0)
            if candidates.size and candidates.max() >= 0:
                free[int(candidates.argmax())] = False
                scores.append(det["score"])
                hits.append(True)
            elif not len(regions) or _covered(_xyxy([det]), regions)[0] < iou_threshold:
                scores.append(det["score"])
                hits.append(False)
    total = sum(map(len, objects.values()))
    if not scores or not total:
        return default
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(scores)[order]
    true = np.cumsum(np.asarray(hits)[order])
    f1 = 2 * true / (np.arange(1, len(ranked) + 1) + total)  # 2PR / (P + R)
    last = np.r_[ranked[1:] != ranked[:-1], True]  # a threshold keeps every tie
    best = int(np.argmax(np.where(last, f1, -1.0)))
    return float(ranked[best])


def _covered(boxes: torch.Tensor, regions: torch.Tensor) -> np.ndarray:
    """For each box, the largest share of its area inside one of ``regions``."""
    lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).clamp(min=1e-9)
    return (inter / area[:, None]).max(dim=1).values.numpy()
