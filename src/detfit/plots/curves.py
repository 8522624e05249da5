"""Training curves: ``results.png`` of one run (every loss, the lr, AP/AP50/AP75 per IoU type per
epoch) and ``detfit plot``'s comparison of several runs. Both read metrics rows, i.e. what
``metrics.csv`` holds, so the file and the picture cannot disagree."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from detfit.errors import DetfitError
from detfit.plots.figure import new_figure

Row = Mapping[str, Any]
IOU_TYPES = ("bbox", "segm", "keypoints")
AP_NAMES = ("AP", "AP50", "AP75")
PANEL_SIZE = (3.2, 2.6)  # inches per panel
TITLE_SPACE = 0.75  # inches above the panels for the figure's title


def read_metrics(run: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` (a run folder or the file), numbers as floats; a
    column a row lacks (say, one added on a resume) reads as NaN."""
    path = Path(run) if Path(run).suffix == ".csv" else Path(run) / "metrics.csv"
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (FileNotFoundError, NotADirectoryError):
        raise DetfitError(f"{path}: not found (is {run} a run folder?)") from None
    if not rows:
        raise DetfitError(f"{path}: no epochs yet")
    out = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if None in row or "epoch" not in row:  # DictReader's key for cells beyond the header
            raise DetfitError(f"{path}: line {line} does not match the header (not a metrics.csv?)")
        epoch = _number(row["epoch"])
        if not math.isfinite(epoch):
            shown = str(row["epoch"])[:40]
            raise DetfitError(f"{path}: line {line}: epoch {shown!r} is not a number")
        out.append({k: _number(v) for k, v in row.items()})
    return out


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def loss_names(rows: Sequence[Row]) -> list[str]:
    """The losses a run logged (``train_<name>`` columns that are losses), total first."""
    from detfit.engine.step import NOT_LOSSES

    names = dict.fromkeys(
        k.removeprefix("train_") for row in rows for k in row if k.startswith("train_")
    )
    losses = [n for n in names if n not in NOT_LOSSES]
    return sorted(losses, key=lambda n: n != "loss")


def iou_types_in(rows: Sequence[Row]) -> list[str]:
    return [t for t in IOU_TYPES if any(f"{t}_AP" in row for row in rows)]


def series(rows: Sequence[Row], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of column ``key`` where a row has it."""
    points = [(row["epoch"], row[key]) for row in rows if key in row and _finite(row[key])]
    return [float(e) for e, _ in points], [float(v) for _, v in points]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@contextmanager
def panel_grid(
    count: int, epochs: float, max_cols: int = 5, top: float = TITLE_SPACE
) -> Iterator[tuple[Figure, list[Axes]]]:
    """A figure of ``count`` panels over epochs 1..``epochs``, ``max_cols`` to a row, ``top``
    inches above them for the title. Margins are fixed rather than solved for (matplotlib's constrained layout
    takes seconds on a busy CPU, and results.png is drawn after every epoch)."""
    cols = min(count, max_cols)
    rows = math.ceil(count / cols)
    width, height = PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + top
    with new_figure(width, height, layout=None) as fig:
        fig.subplots_adjust(
            left=0.65 / width,
            right=1 - 0.15 / width,
            bottom=0.5 / height,
            top=1 - top / height,
            wspace=0.32,
            hspace=0.55,
        )
        axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
        for ax in axes[count:]:
            ax.set_visible(False)
        for ax in axes[:count]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(0.5, max(epochs, 1) + 0.5)  # one epoch is a point in the middle
            ax.set_xlabel("epoch")
        yield fig, axes[:count]


def plot_results(rows: Sequence[Row], title: str = "", best_key: str | None = None) -> Figure:
    """One panel per loss (train, and validation where ``val_<name>`` was logged), one for the
    lr, one per IoU type with AP, AP50 and AP75; a dotted line marks the best epoch by
    ``best_key`` (e.g. ``segm_AP``)."""
    losses, iou_types = loss_names(rows), iou_types_in(rows)
    panels = len(losses) + 1 + len(iou_types)
    with panel_grid(panels, _last_epoch(rows)) as (fig, axes):
        for ax, name in zip(axes, losses):
            for split in ("train", "val"):
                x, y = series(rows, f"{split}_{name}")
                if y:
                    ax.plot(x, y, marker="o", markersize=3, label=split)
            ax.set_title(name if name != "loss" else "loss (weighted sum)")
            if any(f"val_{name}" in row for row in rows):
                ax.legend()
        ax = axes[len(losses)]
        ax.plot(*series(rows, "train_lr"), marker="o", markersize=3, color="tab:gray")
        ax.set_title("learning rate (end of epoch)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        best = _best_epoch(rows, best_key)
        for ax, iou_type in zip(axes[len(losses) + 1 :], iou_types):
            for name in AP_NAMES:
                ax.plot(*series(rows, f"{iou_type}_{name}"), marker="o", markersize=3, label=name)
            ax.set_ylim(_ap_limits(ax))
            if best is not None:
                ax.axvline(best, color="black", linestyle=":", linewidth=1, label="best")
            ax.set_title(f"{iou_type} AP")
            ax.legend()
        if title:
            fig.suptitle(title)
    return fig


def _last_epoch(rows: Sequence[Row]) -> float:
    return max((float(row["epoch"]) for row in rows), default=1.0)


def _best_epoch(rows: Sequence[Row], key: str | None) -> float | None:
    """The first epoch with the highest ``key`` (as best.pt is chosen), None without one."""
    x, y = series(rows, key) if key else ([], [])
    return x[y.index(max(y))] if y else None


def _ap_limits(ax: Axes) -> tuple[float, float]:
    """0 to a little above the highest AP drawn: small APs stay visible, 1.0 fits."""
    top = max((max(line.get_ydata(), default=0) for line in ax.get_lines()), default=0)
    return 0.0, min(1.02, max(0.1, float(top) * 1.15))


def plot_runs(runs: Mapping[str, Sequence[Row]], title: str = "") -> Figure:
    """Several runs on one figure, one colour per run: the training loss (and the validation
    loss where logged), then AP and AP50 per IoU type."""
    everything = [row for rows in runs.values() for row in rows]
    keys = ["train_loss"]
    if any("val_loss" in row for row in everything):
        keys.append("val_loss")
    keys += [f"{t}_{name}" for t in iou_types_in(everything) for name in ("AP", "AP50")]
    with panel_grid(len(keys), _last_epoch(everything), max_cols=3, top=1.0) as (fig, axes):
        for ax, key in zip(axes, keys):
            for name, rows in runs.items():
                ax.plot(*series(rows, key), marker="o", markersize=3, label=name)
            ax.set_title(key.replace("_", " "))
            if key.endswith(AP_NAMES):
                ax.set_ylim(_ap_limits(ax))
        # one legend for every panel, above them, so no curve is hidden behind it
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()),
            frameon=False,
            ncols=min(len(runs), 4),
        )
        if title:
            fig.suptitle(title)
    return fig


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Short, distinct names for ``runs``: their paths below the folder they share."""
    import os

    paths = [Path(r).resolve() for r in runs]
    paths = [p.parent if p.name == "metrics.csv" else p for p in paths]
    if len(set(paths)) < 2:
        return [p.name for p in paths]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) for p in paths]


def plot_run_folders(runs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``detfit plot``: the runs' curves on one figure, written to ``out`` (default:
    ``compare.png`` in the folder the runs share, e.g. ``runs/compare.png``); returns the file."""
    import os

    from detfit.plots.figure import save_figure

    paths = [Path(r) for r in runs]
    histories = {label: read_metrics(p) for label, p in zip(run_labels(paths), paths)}
    if out is None:
        folders = [(p if p.is_dir() else p.parent).resolve() for p in paths]
        out = Path(os.path.commonpath(folders)) / "compare.png"
    title = " vs ".join(histories) if len(histories) <= 3 else f"{len(histories)} runs"
    return save_figure(plot_runs(histories, title), out)
