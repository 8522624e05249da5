"""Precision-recall curves from COCOeval's own table, ``eval["precision"]`` [T, R, K, A, M]
(IoU thresholds x 101 recall points x classes x area ranges x detection caps): nothing is
recomputed, so each curve's mean is exactly the AP the metric reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from detfit.plots.figure import new_figure
from detfit.predict.overlay import class_colour

# Beyond this many classes the per-class curves are drawn thin and grey, without legend entries.
MAX_LEGEND_CLASSES = 12


@dataclass
class PRCurves:
    """Per class (by name): precision at each of ``recall``'s points, at IoU 0.5 and averaged
    over IoU 0.5:0.95; all areas, 100 detections per image. Classes without ground truth are left
    out. ``labels`` are the classes' contiguous labels (for their colours)."""

    recall: np.ndarray
    at_50: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    labels: dict[str, int]
    threshold_name: str = "IoU"  # OKS for keypoints

    def ap(self, name: str) -> float:
        """AP at 0.5:0.95 of class ``name``: the mean of its averaged curve, as COCOeval's."""
        return float(self.mean[name].mean())

    def ap50(self, name: str) -> float:
        return float(self.at_50[name].mean())


def pr_curves(coco_eval: Any, classes: Sequence[str] | None = None) -> PRCurves:
    """The curves of an evaluated, accumulated ``COCOeval`` (pycocotools or a drop-in)."""
    params = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])[:, :, :, 0, -1]  # all areas, most dets
    t50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    names = list(classes or [])
    at_50, mean, labels = {}, {}, {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k]
        if (p < 0).all():  # no ground truth of this class
            continue
        name = names[cat_id] if cat_id < len(names) else str(cat_id)
        at_50[name], mean[name], labels[name] = p[t50], p.mean(axis=0), int(cat_id)
    kind = "OKS" if getattr(params, "iouType", "") == "keypoints" else "IoU"
    return PRCurves(np.asarray(params.recThrs), at_50, mean, labels, kind)


def plot_pr(curves: PRCurves, title: str = "") -> Figure:
    """Solid: precision-recall at IoU 0.5; dashed: the mean over IoU 0.5:0.95, one colour per
    class (the galleries' colours). Several classes add the mean over classes in black."""
    many = len(curves.at_50) > MAX_LEGEND_CLASSES
    t = curves.threshold_name
    with new_figure(8.5, 5.0) as fig:
        ax = fig.subplots()
        for name in curves.at_50:
            colour = (
                (0.6, 0.6, 0.6)
                if many
                else tuple(c / 255 for c in class_colour(curves.labels[name]))
            )
            label = (
                None if many else f"{name}  AP50 {curves.ap50(name):.3f}  AP {curves.ap(name):.3f}"
            )
            ax.plot(
                curves.recall,
                curves.at_50[name],
                color=colour,
                linewidth=0.8 if many else 1.8,
                label=label,
            )
            ax.plot(
                curves.recall,
                curves.mean[name],
                color=colour,
                linewidth=0.8 if many else 1.4,
                linestyle="--",
            )
        if len(curves.at_50) > 1:
            at_50 = np.mean(list(curves.at_50.values()), axis=0)
            mean = np.mean(list(curves.mean.values()), axis=0)
            label = f"all classes  AP50 {at_50.mean():.3f}  AP {mean.mean():.3f}"
            ax.plot(curves.recall, at_50, color="black", linewidth=2.6, label=label)
            ax.plot(curves.recall, mean, color="black", linewidth=2.2, linestyle="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_aspect("equal")
        if not curves.at_50:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        legend_title = f"solid: {t} 0.5\ndashed: mean over {t} 0.5:0.95"
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title=legend_title)
        fig.suptitle(title)
    return fig
