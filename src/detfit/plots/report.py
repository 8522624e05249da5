"""The pictures of one evaluation (``pr_curve_<type>.png``, ``confusion_matrix.png``), drawn the
same way for a training run's best epoch and for ``detfit eval``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from detfit.plots.confusion import plot_confusion
from detfit.plots.figure import save_figure
from detfit.plots.gallery import (
    GALLERY_IMAGES,
    plot_gallery,
    samples_from_evaluation,
    spread_indices,
)
from detfit.plots.pr import plot_pr, pr_curves

if TYPE_CHECKING:
    from detfit.eval.loop import EvaluationResult


def evaluation_figures(
    result: EvaluationResult, classes: Sequence[str], title: str = "", dataset: Any = None
) -> dict[str, Figure]:
    """File name -> figure: a PR figure per IoU type scored, the box confusion matrix and, given
    the evaluated ``dataset``, ``val_predictions.jpg`` (what was scored, beside the ground truth).
    Needs the process that scored (rank 0), which holds the COCOeval objects."""
    from detfit.eval.confusion import IOU_THRESHOLD, confusion_matrix

    figures = {}
    for iou_type, coco_eval in result.coco_eval.items():
        curves = pr_curves(coco_eval, classes)
        heading = f"{iou_type} precision-recall" + (f", {title}" if title else "")
        figures[f"pr_curve_{iou_type}.png"] = plot_pr(curves, heading)
    evaluator = result.evaluator
    threshold = shown_threshold(evaluator)
    if "bbox" in evaluator.results:
        matrix = confusion_matrix(
            evaluator.ground_truth(),
            evaluator.results["bbox"],
            len(classes),
            score_threshold=threshold,
        )
        note = (
            f"boxes matched at IoU >= {IOU_THRESHOLD:g}; detections scoring >= {threshold:.2f} "
            f"(where F1 is best); {len(evaluator.images)} images"
        )
        figures["confusion_matrix.png"] = plot_confusion(matrix, classes, title, note)
    if dataset is not None:
        indices = spread_indices(len(dataset), GALLERY_IMAGES)
        samples = samples_from_evaluation(evaluator, dataset, indices)
        heading = "ground truth | predicted" + (f", {title}" if title else "")
        figures["val_predictions.jpg"] = plot_gallery(samples, classes, heading, threshold)
    return figures


def shown_threshold(evaluator: Any) -> float:
    """The score from which detections are drawn and counted in the pictures of an evaluation:
    where the box detections' F1 at IoU 0.5 is best (predict's default without boxes)."""
    from detfit.eval.confusion import best_f1_threshold
    from detfit.predict.defaults import DEFAULT_SCORE_THRESHOLD

    if "bbox" not in evaluator.results:
        return DEFAULT_SCORE_THRESHOLD
    return best_f1_threshold(evaluator.ground_truth(), evaluator.results["bbox"])


def write_figures(figures: dict[str, Figure], out: str | Path) -> list[Path]:
    """Each figure to ``out/<name>`` (atomically)."""
    return [save_figure(fig, Path(out) / name) for name, fig in figures.items()]
