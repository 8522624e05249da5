"""Test-time augmentation: run a detector on the image and its mirror (and optionally other
sizes), map every view's detections back to the image, and fuse them into one output of the same
structure (boxes, labels, scores, masks [N,1,H,W] probabilities, keypoints).

Fusion (weighted box fusion seeded by NMS, as Detectron2's and Ultralytics' TTA merge views):
the union of all views' detections is clustered per class around the detections class-wise NMS
keeps (IoU above ``iou``, each detection to the best-scoring cluster it overlaps); a cluster's
box is the score-weighted mean of its members' boxes, its score the sum over views of the
view's best member score divided by the number of views (an object one view misses loses
confidence), its mask the mean of the members' mask probabilities before any threshold, its
keypoints their score-weighted mean. With one view every cluster is one detection (the model's
own NMS already separated them), so the output equals plain inference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, box_iou
from torchvision.transforms.v2 import functional as F

Output = dict[str, torch.Tensor]
# Attributes through which a wrapper holds the model it runs (predict backends, DDP).
WRAPPED = ("runner", "model", "module")
FUSION_IOU = 0.55  # above torchvision's box_nms_thresh (0.5): one view's detections never merge


@dataclass(frozen=True)
class TTA:
    """Which views: the image at each of ``scales`` (1.0 is the model's own size: a scale
    multiplies the short side and the cap on the long side the model resizes to), each also
    mirrored when ``flip``. ``keypoint_perm``: which keypoint takes each one's place in a mirror
    (left/right swap, see :func:`detfit.data.transforms.keypoint_flip_permutation`)."""

    flip: bool = True
    scales: tuple[float, ...] = (1.0,)
    keypoint_perm: tuple[int, ...] | None = None
    iou: float = FUSION_IOU

    @property
    def views(self) -> list[tuple[float, bool]]:
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]


def tta_views(
    on: bool, keypoint_names: Sequence[str] | None = None, scales: Sequence[float] = (1.0,)
) -> TTA | None:
    """The ``tta`` and ``tta_scales`` settings as views: the image and its mirror (keypoints'
    left and right swapped) at each scale, or None when off."""
    if not on:
        return None
    from detfit.data.transforms import keypoint_flip_permutation

    perm = keypoint_flip_permutation(list(keypoint_names or []))
    return TTA(flip=True, scales=tuple(scales), keypoint_perm=tuple(perm) if perm else None)


def tta_predict(
    model: Callable[[list[torch.Tensor]], list[Output]],
    images: Sequence[torch.Tensor],
    tta: TTA = TTA(),
) -> list[Output]:
    """``model(images)`` with test-time augmentation: one model call per view for the batch.

    A torchvision detector resizes each image itself (to its ``min_size``, within
    ``max_size``), so a scale is applied there, to those sizes, for the view's call; a model
    whose resizing is out of reach (an exported file) gets the image itself rescaled."""
    per_view = []
    transform = resizing_transform(model)
    for scale, flip in tta.views:
        inside = transform is not None
        views = [_view(im, 1.0 if inside else scale, flip) for im in images]
        with resized_by(transform, scale if inside else 1.0):
            outputs = model(views)
        per_view.append(
            [
                _undo(o, tuple(im.shape[-2:]), tuple(v.shape[-2:]), flip, tta.keypoint_perm)
                for o, im, v in zip(outputs, images, views)
            ]
        )
    return [fuse([view[i] for view in per_view], tta.iou) for i in range(len(images))]


def check_scales_reach(model: object, tta: TTA | None, what: str) -> None:
    """Refuse sizes other than 1.0 for a model that resizes every image to a size it does not
    expose (an exported file, SSD's fixed square): there a scaled view is resized back, so the
    extra views would cost time and change nothing. ``what`` names the model in the line."""
    from detfit.errors import DetfitError

    if tta is None or all(s == 1.0 for s in tta.scales) or resizing_transform(model) is not None:
        return
    raise DetfitError(
        f"{what}: its model resizes every image itself to a size detfit cannot change (an "
        "exported file, or SSD's fixed square), so --tta-scale other than 1 would change "
        "nothing; use the .pt checkpoint of a model with min_size/max_size, or the flip alone"
    )


def resizing_transform(model: object) -> GeneralizedRCNNTransform | None:
    """The transform that resizes images inside ``model`` (a torchvision detector, or what wraps
    one: a predict backend's ``runner``, an eager runner's ``model``, DDP's ``module``), when its
    sizes can be scaled; None otherwise (SSD's fixed square, exported files)."""
    candidates, seen = [model], 0
    while seen < len(candidates) and seen < 8:  # the model, what it wraps, what that wraps
        candidate = candidates[seen]
        seen += 1
        transform = getattr(candidate, "transform", None)
        if isinstance(transform, GeneralizedRCNNTransform):
            return transform if transform.fixed_size is None else None
        candidates += [getattr(candidate, n) for n in WRAPPED if hasattr(candidate, n)]
    return None


@contextmanager
def resized_by(transform: GeneralizedRCNNTransform | None, scale: float) -> Iterator[None]:
    """The model's resize sizes times ``scale`` for the time of one call, then as they were."""
    if transform is None or scale == 1.0:
        yield
        return
    min_size, max_size = transform.min_size, transform.max_size
    transform.min_size = tuple(max(1, round(side * scale)) for side in min_size)
    transform.max_size = max(1, round(max_size * scale))
    try:
        yield
    finally:
        transform.min_size, transform.max_size = min_size, max_size


def _view(image: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
    if scale != 1.0:
        height, width = image.shape[-2:]
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, size, antialias=True)
    return image.flip(-1) if flip else image


def _undo(
    out: Output,
    size: tuple[int, int],
    view_size: tuple[int, int],
    flip: bool,
    perm: Sequence[int] | None,
) -> Output:
    """A view's detections in the original image's pixels: unmirrored, then rescaled."""
    out = {k: v.detach().cpu() for k, v in out.items()}
    (height, width), (view_height, view_width) = size, view_size
    if flip:
        boxes = out["boxes"].clone()
        boxes[:, 0], boxes[:, 2] = view_width - out["boxes"][:, 2], view_width - out["boxes"][:, 0]
        out["boxes"] = boxes
        if "masks" in out:
            out["masks"] = out["masks"].flip(-1)
        if "keypoints" in out:
            kps = out["keypoints"].clone()
            kps[..., 0] = view_width - kps[..., 0]
            if perm is not None:
                kps = kps[:, list(perm)]
                if "keypoints_scores" in out:
                    out["keypoints_scores"] = out["keypoints_scores"][:, list(perm)]
            out["keypoints"] = kps
    if (view_height, view_width) != (height, width):
        sx, sy = width / view_width, height / view_height
        out["boxes"] = out["boxes"] * torch.tensor([sx, sy, sx, sy])
        if "masks" in out:
            masks = out["masks"]
            out["masks"] = (
                F.resize(masks, [height, width], antialias=False)
                if len(masks)
                else masks.new_zeros((0, 1, height, width))
            )
        if "keypoints" in out:
            kps = out["keypoints"].clone()
            kps[..., 0] *= sx
            kps[..., 1] *= sy
            out["keypoints"] = kps
    return out


def fuse(views: Sequence[Output], iou: float = FUSION_IOU) -> Output:
    """One output from the detections of several views of one image (see the module's text)."""
    cap = max(len(v["boxes"]) for v in views)
    keys = list(views[0])
    union = {k: torch.cat([v[k] for v in views]) for k in keys}
    view_of = torch.cat([torch.full((len(v["boxes"]),), i) for i, v in enumerate(views)])
    boxes, scores, labels = union["boxes"], union["scores"], union["labels"]
    if not len(boxes):
        return dict(views[0])
    heads = batched_nms(boxes.float(), scores.float(), labels, iou)  # by score, descending
    overlap = box_iou(boxes[heads].float(), boxes.float()) > iou
    overlap &= labels[heads][:, None] == labels[None, :]
    overlap[torch.arange(len(heads)), heads] = True
    cluster = overlap.float().argmax(0)  # the best-scoring head each detection overlaps
    fused: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for c, head in enumerate(heads.tolist()):
        members = (cluster == c).nonzero().flatten()
        # one detection per view, its best: a view's duplicates must not outweigh another view
        best = [m for m in members.tolist() if m == _best_of_view(members, view_of, scores, m)]
        best_t = torch.tensor(best)
        weights = scores[best_t] / scores[best_t].sum()
        for key in keys:
            value = union[key]
            if key == "boxes":
                fused[key].append((weights[:, None] * value[best_t]).sum(0))
            elif key == "scores":
                fused[key].append(scores[best_t].sum() / len(views))
            elif key == "masks":
                fused[key].append(value[best_t].float().mean(0).to(value.dtype))
            elif key == "keypoints":
                kps = value[best_t].clone()
                xy = (weights[:, None, None] * kps[..., :2]).sum(0)
                fused[key].append(torch.cat([xy, value[head][..., 2:]], -1))
            elif key == "keypoints_scores":
                fused[key].append(value[best_t].mean(0))
            else:
                fused[key].append(value[head])
    out = {k: torch.stack(v) for k, v in fused.items()}
    order = out["scores"].argsort(descending=True, stable=True)[:cap]
    return {k: v[order] for k, v in out.items()}


def _best_of_view(
    members: torch.Tensor, view_of: torch.Tensor, scores: torch.Tensor, member: int
) -> int:
    same = members[view_of[members] == view_of[member]]
    return int(same[scores[same].argmax()])
