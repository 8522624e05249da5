"""Eager vs exported detections, matched detection by detection (never by index: equal scores
may come out in another order), with these tolerances: same labels, boxes within 1e-2 px,
scores within 1e-3, mask IoU >= 0.99."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

Output = dict[str, torch.Tensor]
BOX_TOL, SCORE_TOL, MASK_IOU = 1e-2, 1e-3, 0.99
# Keypoints come from heatmap arg-maxima refined on a 56x56 grid upsampled to the box, so a
# 1e-6 difference in a heatmap moves a keypoint by a fraction of a pixel.
KEYPOINT_TOL = 0.25


@dataclass
class ImageParity:
    """How one image's exported detections compare with eager torch's."""

    name: str
    height: int
    width: int
    eager: int
    exported: int
    matched: int
    box_px: float  # largest coordinate difference over matched detections
    score: float  # largest score difference over matched detections
    mask_iou: float | None  # smallest IoU over matched masks (None: no masks)
    tied: int  # unmatched detections tied with the lowest kept score (a top-k cut-off)
    keypoint_px: float | None = None  # largest keypoint difference (None: no keypoints)
    box_tol: float = BOX_TOL  # the largest box difference that passes, in pixels

    @property
    def unmatched(self) -> int:
        return self.eager + self.exported - 2 * self.matched - self.tied

    @property
    def ok(self) -> bool:
        masks_ok = self.mask_iou is None or self.mask_iou >= MASK_IOU
        keypoints_ok = self.keypoint_px is None or self.keypoint_px <= KEYPOINT_TOL
        boxes_ok = self.box_px <= self.box_tol and self.score <= SCORE_TOL
        return self.unmatched == 0 and boxes_ok and masks_ok and keypoints_ok

    def line(self) -> str:
        iou = "-" if self.mask_iou is None else f"{self.mask_iou:.4f}"
        tied = f" ({self.tied} tied at the cut-off)" if self.tied else ""
        if self.keypoint_px is not None:
            iou = f"kp {self.keypoint_px:.1e}"
        return (
            f"{self.name:28.28s} {self.height:4d}x{self.width:<4d} {self.eager:5d} {self.exported:8d}"
            f" {self.matched:7d}{tied:>1s} {self.box_px:10.2e} {self.score:9.2e} {iou:>8s}"
            f"  {'ok' if self.ok else 'FAIL'}"
        )


HEADER = (
    f"{'image':28s} {'size':9s} {'eager':>5s} {'exported':>8s} {'matched':>7s} "
    f"{'max dbox px':>10s} {'max dscore':>9s} {'mask IoU / keypoints px':>8s}"
)


def match(a: Output, b: Output) -> list[tuple[int, int]]:
    """Pairs (i, j) of same-label detections overlapping at IoU >= 0.5, closest boxes and
    scores first, each detection used once."""
    if not len(a["boxes"]) or not len(b["boxes"]):
        return []
    dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1)
    dist = dist + (a["scores"][:, None] - b["scores"][None, :]).abs()
    dist[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
    dist[box_iou(a["boxes"].float(), b["boxes"].float()) < 0.5] = float("inf")
    pairs, used_a, used_b = [], set(), set()
    for flat in torch.argsort(dist.flatten()).tolist():
        i, j = divmod(flat, dist.shape[1])
        if dist[i, j] == float("inf"):
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return pairs


def _tied(scores: torch.Tensor, unmatched: list[int]) -> int:
    """Unmatched detections scoring within SCORE_TOL of the lowest one kept: a top-k or
    threshold cut-off between near-equal scores, not a difference of the models."""
    if not unmatched:
        return 0
    floor = float(scores.min())
    return sum(float(scores[i]) <= floor + SCORE_TOL for i in unmatched)


def mask_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> float:
    ma, mb = a > threshold, b > threshold
    union = (ma | mb).sum().item()
    return 1.0 if union == 0 else (ma & mb).sum().item() / union


def compare(
    name: str, size: tuple[int, int], eager: Output, exported: Output, box_tol: float = BOX_TOL
) -> ImageParity:
    """How ``exported``'s detections of one image compare with ``eager``'s; boxes pass within
    ``box_tol`` pixels."""
    pairs = match(eager, exported)
    ia = [i for i, _ in pairs]
    ib = [j for _, j in pairs]
    box_px = score = 0.0
    iou = None
    if pairs:
        box_px = float((eager["boxes"][ia] - exported["boxes"][ib]).abs().max())
        score = float((eager["scores"][ia] - exported["scores"][ib]).abs().max())
    if "masks" in eager and "masks" in exported:
        ious = [mask_iou(eager["masks"][i], exported["masks"][j]) for i, j in pairs]
        iou = min(ious, default=1.0)
    keypoint_px = None
    if "keypoints" in eager and "keypoints" in exported:
        keypoint_px = 0.0
        if pairs:
            diff = eager["keypoints"][ia, :, :2] - exported["keypoints"][ib, :, :2]
            keypoint_px = float(diff.abs().max())
    left_a = sorted(set(range(len(eager["boxes"]))) - set(ia))
    left_b = sorted(set(range(len(exported["boxes"]))) - set(ib))
    tied = _tied(eager["scores"], left_a) + _tied(exported["scores"], left_b)
    return ImageParity(
        name,
        size[0],
        size[1],
        len(eager["boxes"]),
        len(exported["boxes"]),
        len(pairs),
        box_px,
        score,
        iou,
        tied,
        keypoint_px,
        box_tol,
    )
