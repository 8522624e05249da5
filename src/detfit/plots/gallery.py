"""Pictures of images with their objects: ground truth beside predictions (``val_predictions.jpg``
and TensorBoard's images), drawn with :func:`~detfit.predict.overlay.draw_prediction`, the one
drawing routine ``detfit predict`` uses too."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from detfit.plots.figure import as_hwc, new_figure
from detfit.predict.defaults import DEFAULT_MASK_THRESHOLD, DEFAULT_SCORE_THRESHOLD
from detfit.predict.overlay import draw_prediction

PAIRS_PER_ROW = 2
GALLERY_IMAGES = 8  # test images in val_predictions.jpg
CELL = (3.6, 3.0)  # inches per image
# Images are shrunk to fit their cell before drawing, so labels keep their readable pixel size
# and the figure draws fast; TensorBoard's side-by-side pictures are capped likewise.
CELL_PIXELS = (350, 260)
TENSORBOARD_PIXELS = (480, 400)
GAP = 8  # pixels between ground truth and prediction in a side-by-side image


@dataclass
class Sample:
    """One image (uint8 [3,H,W]), its target, the model's output on it (or None) and its file
    name (or None)."""

    image: torch.Tensor
    target: dict[str, Any]
    output: dict[str, torch.Tensor] | None = None
    file: str | None = None

    @property
    def image_id(self) -> int:
        return int(torch.as_tensor(self.target["image_id"]).reshape(-1)[0])

    @property
    def name(self) -> str:
        """How titles call the image: its file name, else its id."""
        return self.file or f"image {self.image_id}"


def file_name(dataset: Any, idx: int) -> str | None:
    """The file behind ``dataset[idx]`` (looking through Subsets) for detfit's datasets."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset, idx = dataset.dataset, dataset.indices[idx]
    if hasattr(dataset, "records"):  # DetectionDataset
        return dataset.records[idx].path.name
    if hasattr(dataset, "imgs"):  # PennFudanDataset
        return Path(dataset.imgs[idx]).name
    return None


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """A dataset's image (float in [0, 1], or uint8) as uint8 [3,H,W]."""
    image = torch.as_tensor(image).detach().cpu()
    if image.is_floating_point():
        image = (image * 255).round().clamp(0, 255)
    return image.to(torch.uint8).as_subclass(torch.Tensor)


def _plain(value: Any) -> torch.Tensor:
    return torch.as_tensor(value).detach().cpu().as_subclass(torch.Tensor)


def _names(labels: torch.Tensor, classes: Sequence[str]) -> list[str]:
    return [classes[k] if 0 <= k < len(classes) else str(k) for k in labels.tolist()]


def draw_target(
    image: torch.Tensor, target: dict[str, Any], classes: Sequence[str]
) -> torch.Tensor:
    """Ground truth on ``image``: masks, boxes, class names; crowd regions say so."""
    labels = _plain(target["labels"])
    names = _names(labels, classes)
    crowd = _plain(target.get("iscrowd", torch.zeros(len(labels)))).tolist()
    names = [f"{n} (crowd)" if c else n for n, c in zip(names, crowd)]
    masks = _plain(target["masks"]) > DEFAULT_MASK_THRESHOLD if "masks" in target else None
    keypoints = _plain(target["keypoints"]) if "keypoints" in target else None
    return draw_prediction(
        as_uint8(image), _plain(target["boxes"]), labels.tolist(), None, names, masks, keypoints
    )


def draw_output(
    image: torch.Tensor,
    output: dict[str, torch.Tensor],
    classes: Sequence[str],
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> torch.Tensor:
    """The detections scoring at least ``score_threshold`` on ``image``, as ``detfit predict``
    draws them."""
    keep = _plain(output["scores"]) >= score_threshold
    labels = _plain(output["labels"])[keep]
    masks = None
    if "masks" in output:
        masks = _plain(output["masks"])[keep].reshape(int(keep.sum()), *image.shape[-2:])
        masks = masks > DEFAULT_MASK_THRESHOLD
    keypoints = _plain(output["keypoints"])[keep] if "keypoints" in output else None
    return draw_prediction(
        as_uint8(image),
        _plain(output["boxes"])[keep],
        labels.tolist(),
        _plain(output["scores"])[keep].tolist(),
        _names(labels, classes),
        masks,
        keypoints,
    )


def _scaled(objects: dict[str, Any], scale: float, size: tuple[int, int]) -> dict[str, Any]:
    """A target or output with its boxes, keypoints and masks (as probabilities) resized."""
    out = dict(objects)
    if "boxes" in out:
        out["boxes"] = _plain(out["boxes"]).float() * scale
    if "keypoints" in out:
        keypoints = _plain(out["keypoints"]).float().clone()
        keypoints[..., :2] *= scale
        out["keypoints"] = keypoints
    if "masks" in out:
        masks = _plain(out["masks"]).float()
        flat = masks.reshape(-1, 1, *masks.shape[-2:])
        if len(flat):
            flat = torch.nn.functional.interpolate(flat, size=size, mode="bilinear")
        out["masks"] = flat.reshape(*masks.shape[:-2], *size)
    return out


def shrunk(sample: Sample, max_width: int, max_height: int) -> Sample:
    """``sample`` scaled down (never up) to fit ``max_width`` x ``max_height`` pixels."""
    height, width = sample.image.shape[-2:]
    scale = min(max_width / width, max_height / height)
    if scale >= 1:
        return sample
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = torch.nn.functional.interpolate(
        sample.image[None].float(), size=size, mode="bilinear", antialias=True
    )[0]
    output = _scaled(sample.output, scale, size) if sample.output is not None else None
    image = image.round().clamp(0, 255).to(torch.uint8)
    return Sample(image, _scaled(sample.target, scale, size), output, sample.file)


def side_by_side(
    sample: Sample, classes: Sequence[str], score_threshold: float = DEFAULT_SCORE_THRESHOLD
) -> torch.Tensor:
    """Ground truth | predictions scoring at least ``score_threshold``, as one uint8 image
    (TensorBoard's per-epoch pictures)."""
    sample = shrunk(sample, *TENSORBOARD_PIXELS)
    truth = draw_target(sample.image, sample.target, classes)
    predicted = draw_output(sample.image, sample.output, classes, score_threshold)
    gap = torch.full((3, truth.shape[1], GAP), 255, dtype=torch.uint8)
    return torch.cat([truth, gap, predicted], dim=2)


@contextmanager
def image_grid(rows: int, cols: int) -> Iterator[tuple[Figure, list[Any]]]:
    """A ``rows`` x ``cols`` grid of axis-free cells of ``CELL`` inches, with room for a title
    above each and for the figure's title (fixed margins: a solved layout costs seconds here)."""
    width, height = CELL[0] * cols, CELL[1] * rows + 0.5
    with new_figure(width, height, layout=None) as fig:
        fig.subplots_adjust(
            left=0.05 / width,
            right=1 - 0.05 / width,
            bottom=0.05 / height,
            top=1 - 0.75 / height,
            wspace=0.03,
            hspace=0.3 / (CELL[1] - 0.3),
        )
        axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
        for ax in axes:
            ax.set_axis_off()
        yield fig, axes


def _count(output: dict[str, torch.Tensor], threshold: float) -> int:
    return int((_plain(output["scores"]) >= threshold).sum())


def plot_gallery(
    samples: Sequence[Sample],
    classes: Sequence[str],
    title: str = "",
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> Figure:
    """A grid of images, each as ground truth beside the predictions scoring at least
    ``score_threshold``, ``PAIRS_PER_ROW`` pairs to a row."""
    threshold = score_threshold
    cols = 2 * min(PAIRS_PER_ROW, max(len(samples), 1))
    rows = max(1, math.ceil(len(samples) / PAIRS_PER_ROW))
    with image_grid(rows, cols) as (fig, axes):
        for k, sample in enumerate(samples):
            sample = shrunk(sample, *CELL_PIXELS)
            truth, predicted = axes[2 * k], axes[2 * k + 1]
            truth.imshow(as_hwc(draw_target(sample.image, sample.target, classes)))
            truth.set_title(f"{sample.name}: ground truth ({len(sample.target['labels'])})")
            predicted.imshow(as_hwc(draw_output(sample.image, sample.output, classes, threshold)))
            predicted.set_title(
                f"predicted ({_count(sample.output, threshold)} scoring >= {threshold:.2f})"
            )
        if title:
            fig.suptitle(title)
    return fig


def plot_samples(samples: Sequence[Sample], classes: Sequence[str], title: str = "") -> Figure:
    """A contact sheet of images with their ground truth (``detfit data show``)."""
    cols = min(4, max(len(samples), 1))
    rows = max(1, math.ceil(len(samples) / cols))
    with image_grid(rows, cols) as (fig, axes):
        for ax, sample in zip(axes, samples):
            sample = shrunk(sample, *CELL_PIXELS)
            ax.imshow(as_hwc(draw_target(sample.image, sample.target, classes)))
            ax.set_title(f"{sample.name} ({len(sample.target['labels'])})", fontsize=9)
        if title:
            fig.suptitle(title)
    return fig


def spread_indices(total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(total)``: the same images every epoch, from the
    whole set rather than its first files."""
    n = min(n, total)
    return [round(k * (total - 1) / max(n - 1, 1)) for k in range(n)] if n > 0 else []


def outputs_from_results(
    results: dict[str, list[dict[str, Any]]], height: int, width: int
) -> dict[str, torch.Tensor]:
    """One image's COCO results (bbox, and segm/keypoints when scored) back as a model output
    dict: what the metric saw, drawn without running the model again."""
    import pycocotools.mask as mask_util

    from detfit.data.rle import compressed

    boxes = results.get("bbox", [])
    xywh = torch.tensor([d["bbox"] for d in boxes], dtype=torch.float32).reshape(-1, 4)
    output = {
        "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
        "labels": torch.tensor([d["category_id"] for d in boxes], dtype=torch.int64),
        "scores": torch.tensor([d["score"] for d in boxes], dtype=torch.float32),
    }
    if "segm" in results:
        rles = [compressed(d["segmentation"]) for d in results["segm"]]
        masks = mask_util.decode(rles) if rles else np.zeros((height, width, 0), np.uint8)
        output["masks"] = torch.from_numpy(masks.transpose(2, 0, 1).copy())[:, None].float()
    if "keypoints" in results:
        points = torch.tensor([d["keypoints"] for d in results["keypoints"]], dtype=torch.float32)
        output["keypoints"] = (
            points.reshape(len(points), -1, 3) if len(points) else points.new_zeros(0, 0, 3)
        )
    return output


def samples_from_evaluation(evaluator: Any, dataset: Any, indices: Sequence[int]) -> list[Sample]:
    """``dataset[i]`` for each index with the detections ``evaluator`` (a
    :class:`~detfit.eval.coco.CocoEvaluator` that has gathered, i.e. rank 0) holds for it."""
    by_image: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for iou_type, results in evaluator.results.items():
        for det in results:
            by_image.setdefault(det["image_id"], {}).setdefault(iou_type, [])
            by_image[det["image_id"]][iou_type].append(det)
    samples = []
    for i in indices:
        image, target = dataset[i]
        sample = Sample(as_uint8(image), target, file=file_name(dataset, i))
        found = by_image.get(sample.image_id, {})
        found = {t: found.get(t, []) for t in evaluator.results}
        sample.output = outputs_from_results(found, *sample.image.shape[-2:])
        samples.append(sample)
    return samples
