"""``confusion_matrix.png``: counts and row-normalised shares side by side, background last."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from detfit.plots.figure import new_figure

# Above this many classes the cells carry no numbers (they would not fit).
MAX_ANNOTATED_CLASSES = 25


def display_order(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (label 0 = background first) with the background moved last, as drawn."""
    order = [*range(1, len(matrix)), 0]
    return matrix[np.ix_(order, order)]


def normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum: for an object class, what share of its objects ended up in
    each column; for the background row, how the false positives split over classes."""
    sums = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros(matrix.shape), where=sums > 0)


def plot_confusion(
    matrix: np.ndarray, classes: Sequence[str], title: str = "", note: str = ""
) -> Figure:
    """Counts (left) and row shares (right) of a :func:`~detfit.eval.confusion.confusion_matrix`;
    ``classes[0]`` is the background. ``note`` goes under the title (the thresholds used)."""
    names = [*classes[1:]]
    rows = [*names, "background\n(false positive)"]
    cols = [*names, "background\n(missed)"]
    counts = display_order(matrix)
    shares = display_order(normalised(matrix))
    n = len(rows)
    side = min(16.0, max(3.4, 0.55 * n + 2.2))
    annotate = n <= MAX_ANNOTATED_CLASSES
    with new_figure(2 * side + 1.0, side + 0.8) as fig:
        axes = fig.subplots(1, 2)
        for ax, values, what in ((axes[0], counts, "counts"), (axes[1], shares, "share of row")):
            image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if what != "counts" else None)
            ax.grid(False)
            ax.set_xticks(
                range(n), cols, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center"
            )
            ax.set_yticks(range(n), rows)
            ax.set_xlabel("predicted")
            ax.set_ylabel("ground truth")
            ax.set_title(what)
            if not annotate:  # the numbers are in the cells when they fit
                fig.colorbar(image, ax=ax, shrink=0.8)
            else:
                top = values.max() if values.max() > 0 else 1
                for (i, j), v in np.ndenumerate(values):
                    if i == n - 1 and j == n - 1:
                        continue  # background called background: not counted
                    text = f"{int(v)}" if what == "counts" else f"{v:.2f}"
                    colour = "white" if v > 0.6 * top else "black"
                    ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
        fig.suptitle(f"{title}\n{note}" if note else title)
    return fig
