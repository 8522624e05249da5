"""Sliced inference: run a detector on overlapping tiles of a large image (and, optionally, on the
whole image), map the detections back to image coordinates and merge the duplicates, so that
objects a few pixels wide after the model's resize are still found.

Written on ``torchvision.ops`` rather than taken from sahi (0.12) or supervision's
``InferenceSlicer`` (0.31):

- sahi's torchvision wrapper returns its own ``ObjectPrediction`` objects rather than torchvision's
  dict (no keypoints), wraps a torch module (not detfit's ONNX and TorchScript files), and pulls
  in OpenCV, Shapely, matplotlib, click and fire;
- ``InferenceSlicer`` (which does batch tiles, in threads) speaks numpy images and
  ``sv.Detections`` (no keypoints, so a conversion each way per tile), has no whole-image pass,
  merges detections of one tile with each other too, and with no overlap clips the edge tiles
  (smaller than the others, so seen at another scale).

Here every tile has the same size (the last one of a row or column is moved back inside the image),
tiles go through the model in batches, through any runner (an eager module, a Backend of any model
kind), and the output is torchvision's own dict (boxes, labels, scores, masks, keypoints): the
Predictor, ``detfit eval`` and the overlays take it unchanged.

Duplicates are merged greedily as SAHI's default does (greedy non-maximum merging, matched by
intersection over the smaller box, IoS): an object cut by a tile edge gives partial boxes whose
IoU is small but which lie inside one another. Two detections of the same window never merge:
the model's own NMS already decided about those (two people side by side stay two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from detfit.errors import DetfitError
from detfit.predict.defaults import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP

Output = dict[str, torch.Tensor]
Runner = Callable[[list[torch.Tensor]], list[Output]]
Window = tuple[int, int, int, int]  # x0, y0, x1, y1: pixels [y0:y1, x0:x1]

MAX_OVERLAP = 0.9
MIN_SLICE = 32
MERGE_IOS = 0.5  # SAHI's default match threshold
MAX_DETECTIONS = 100  # as torchvision's box_detections_per_img, and COCO's maxDets


class SliceTooLarge(DetfitError):
    """A slice larger than the image: a mistake in the command, not in one input."""


@dataclass(frozen=True)
class Slicing:
    """How to slice: square tiles of ``size`` pixels overlapping by ``overlap`` of a tile, plus
    the whole image when ``full`` (large objects, which no tile holds whole)."""

    size: int
    overlap: float = DEFAULT_OVERLAP
    full: bool = True
    merge_threshold: float = MERGE_IOS
    max_detections: int = MAX_DETECTIONS
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.size < MIN_SLICE:
            raise DetfitError(f"--slice {self.size}: tiles must be at least {MIN_SLICE} px")
        if not 0 <= self.overlap <= MAX_OVERLAP:
            raise DetfitError(f"--overlap {self.overlap}: must be between 0 and {MAX_OVERLAP}")

    def check(self, height: int, width: int, name: str = "image") -> None:
        """A slice larger than the whole image does nothing but cost time: say so."""
        if self.size > height and self.size > width:
            raise SliceTooLarge(
                f"{name}: --slice {self.size} is larger than the image ({width}x{height} px); "
                "give a smaller --slice or predict without it"
            )


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:  # the last tile ends at the edge, with the same size
        starts.append(length - tile)
    return starts


def tile_windows(height: int, width: int, size: int, overlap: float) -> list[Window]:
    """Tiles of ``size`` x ``size`` (a side shorter than ``size`` is one tile of its length),
    ``overlap`` of a tile shared with the next, the last of each row and column flush with the
    image edge: together they cover every pixel, and all have the same size."""
    tile_h, tile_w = min(size, height), min(size, width)
    stride_h = max(1, int(tile_h * (1 - overlap)))
    stride_w = max(1, int(tile_w * (1 - overlap)))
    return [
        (x0, y0, x0 + tile_w, y0 + tile_h)
        for y0 in _starts(height, tile_h, stride_h)
        for x0 in _starts(width, tile_w, stride_w)
    ]


def intersection_over_smaller(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoS of one xyxy box with each of ``boxes`` (torchvision.ops has IoU, not this)."""
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (box[2:] - box[:2]).clamp(min=0).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    return inter / torch.minimum(area, areas).clamp(min=1e-6)


def greedy_merge(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    windows: torch.Tensor,
    threshold: float = MERGE_IOS,
) -> list[list[int]]:
    """Clusters of detection indices, best-scoring first: each cluster starts at the best
    detection left and takes, best first, the same-class detections of other windows whose IoS
    with the cluster's (growing) box is at least ``threshold``."""
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, labels, windows = boxes[order], labels[order], windows[order]
    free = torch.ones(len(order), dtype=torch.bool)
    clusters = []
    for i in range(len(order)):
        if not free[i]:
            continue
        free[i] = False
        members, box = [i], boxes[i].clone()
        used = windows[i : i + 1].clone()
        while True:
            eligible = free & (labels == labels[i]) & ~torch.isin(windows, used)
            if not eligible.any():
                break
            candidates = eligible.nonzero()[:, 0]
            match = intersection_over_smaller(box, boxes[candidates]) >= threshold
            if not match.any():
                break
            j = int(candidates[match][0])  # the best-scoring match
            free[j] = False
            members.append(j)
            box = torch.cat(
                [torch.minimum(box[:2], boxes[j, :2]), torch.maximum(box[2:], boxes[j, 2:])]
            )
            used = torch.cat([used, windows[j : j + 1]])
        clusters.append([int(order[m]) for m in members])
    return clusters


def sliced_output(
    run: Runner,
    image: torch.Tensor,
    slicing: Slicing,
    mask_threshold: float = 0.5,
    min_score: float = 0.0,
) -> Output:
    """torchvision's detection dict for float [3,H,W] ``image``, from tiles (and the whole image)
    merged; masks come back as bool [N,1,H,W] (thresholded at ``mask_threshold`` before the
    pieces of one object are united, which a probability cannot be). Detections scoring below
    ``min_score`` are dropped first: no full-size mask is pasted for them."""
    height, width = image.shape[-2:]
    windows = tile_windows(height, width, slicing.size, slicing.overlap)
    if slicing.full and windows != [(0, 0, width, height)]:
        windows.append((0, 0, width, height))
    crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
    outputs: list[Output] = []
    for start in range(0, len(crops), slicing.batch_size):
        for out in run(crops[start : start + slicing.batch_size]):
            out = _kept(out, min_score)
            if "masks" in out:  # bool now: a quarter of the memory until the merge
                out["masks"] = out["masks"] > mask_threshold
            outputs.append(out)
    return merge_outputs(outputs, windows, height, width, slicing, mask_threshold, min_score)


def _kept(out: Output, min_score: float) -> Output:
    keep = out["scores"] >= min_score
    return {k: v[keep].cpu() for k, v in out.items()}


def merge_outputs(
    outputs: Sequence[Output],
    windows: Sequence[Window],
    height: int,
    width: int,
    slicing: Slicing,
    mask_threshold: float = 0.5,
    min_score: float = 0.0,
) -> Output:
    """One image's detections from the outputs of its ``windows``: shifted into image
    coordinates, merged, the ``slicing.max_detections`` best kept, masks pasted."""
    outputs = [_kept(out, min_score) for out in outputs]
    offsets = torch.tensor([[x0, y0, x0, y0] for x0, y0, _, _ in windows], dtype=torch.float32)
    counts = [len(out["scores"]) for out in outputs]
    source = torch.repeat_interleave(torch.arange(len(outputs)), torch.tensor(counts))
    within = torch.cat([torch.arange(n) for n in counts]) if counts else torch.zeros(0)
    boxes = torch.cat([out["boxes"].float().reshape(-1, 4) for out in outputs]) + offsets[source]
    scores = torch.cat([out["scores"].float() for out in outputs])
    labels = torch.cat([out["labels"].long() for out in outputs])
    clusters = greedy_merge(boxes, scores, labels, source, slicing.merge_threshold)
    clusters = clusters[: slicing.max_detections]
    best = torch.tensor([c[0] for c in clusters], dtype=torch.long)
    merged: Output = {
        "boxes": torch.stack(
            [torch.cat([boxes[c, :2].min(0).values, boxes[c, 2:].max(0).values]) for c in clusters]
        )
        if clusters
        else boxes.new_zeros(0, 4),
        "scores": scores[best],
        "labels": labels[best],
    }
    if "keypoints" in outputs[0]:
        points = []
        for k in best.tolist():  # the best detection's keypoints, shifted
            p = outputs[source[k]]["keypoints"][within[k]].float().clone()
            p[:, :2] += offsets[source[k], :2]
            points.append(p)
        kp_shape = outputs[0]["keypoints"].shape[1:]
        merged["keypoints"] = torch.stack(points) if points else torch.zeros(0, *kp_shape)
    if "masks" in outputs[0]:
        masks = torch.zeros(len(clusters), 1, height, width, dtype=torch.bool)
        for n, cluster in enumerate(clusters):
            for k in cluster:
                x0, y0, x1, y1 = windows[source[k]]
                piece = outputs[source[k]]["masks"][within[k], 0] > mask_threshold
                masks[n, 0, y0:y1, x0:x1] |= piece
        merged["masks"] = masks
    return merged


class SlicedModel(nn.Module):
    """A torchvision detector that predicts each image by slices: what ``detfit eval --slice``
    scores, through the same evaluation loop (and COCO metric) as the whole-image model."""

    def __init__(self, model: nn.Module, slicing: Slicing) -> None:
        super().__init__()
        self.model, self.slicing = model, slicing

    def forward(self, images: list[torch.Tensor]) -> list[Output]:
        for image in images:
            self.slicing.check(*image.shape[-2:])
        return [sliced_output(self.model, image, self.slicing) for image in images]
