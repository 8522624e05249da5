"""Pictures of runs, evaluations and datasets (matplotlib, Agg canvas, no pyplot).

Every ``plot_*`` function returns its :class:`matplotlib.figure.Figure`, whose artists hold the
data drawn; :func:`save_figure` writes one atomically.

- ``curves``: ``results.png`` (losses, lr, AP per epoch) and ``detfit plot``'s run comparison;
- ``pr``: precision-recall curves from COCOeval's own precision table;
- ``confusion``: the detection confusion matrix (:mod:`detfit.eval.confusion` counts it);
- ``gallery``: ground truth beside predictions, and contact sheets;
- ``dataset``: ``detfit data show`` (samples and label statistics);
- ``report``: the figures of one evaluation, for a run's best epoch and ``detfit eval``.
"""

from detfit.plots.confusion import plot_confusion
from detfit.plots.curves import plot_results, plot_runs, read_metrics
from detfit.plots.dataset import plot_labels, show_dataset
from detfit.plots.figure import save_figure
from detfit.plots.gallery import plot_gallery, plot_samples
from detfit.plots.pr import plot_pr, pr_curves
from detfit.plots.report import evaluation_figures, write_figures

__all__ = [
    "evaluation_figures",
    "plot_confusion",
    "plot_gallery",
    "plot_labels",
    "plot_pr",
    "plot_results",
    "plot_runs",
    "plot_samples",
    "pr_curves",
    "read_metrics",
    "save_figure",
    "show_dataset",
    "write_figures",
]
