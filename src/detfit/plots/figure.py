"""Figures without pyplot, and files written atomically.

Every plotting function builds a :class:`matplotlib.figure.Figure` on the Agg canvas directly (no
global pyplot state, no display, safe beside a training loop) and returns it, so tests read the
drawn series back from the figure's artists. :func:`save_figure` writes through a temporary file:
a reader never sees a half-written PNG.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detfit.fileio import atomic_write

DPI = 100
JPEG_QUALITY = 90
# Readable at 100 % zoom; rcParams are read when an artist is made, so figures are built inside.
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@contextmanager
def new_figure(width: float, height: float, layout: str | None = "constrained") -> Iterator[Figure]:
    """A blank ``width`` x ``height``-inch figure (``DPI`` pixels per inch), detfit's style in
    force while the block builds it."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
        FigureCanvasAgg(fig)
        yield fig


def figure_bytes(fig: Figure, suffix: str = ".png") -> bytes:
    """``fig`` encoded as PNG, or JPEG for a ``.jpg``/``.jpeg`` suffix."""
    buffer = io.BytesIO()
    if suffix.lower() in (".jpg", ".jpeg"):
        fig.savefig(buffer, format="jpeg", dpi=DPI, pil_kwargs={"quality": JPEG_QUALITY})
    else:
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (the format from its suffix); returns ``path``."""
    path = Path(path)
    data = figure_bytes(fig, path.suffix)
    atomic_write(path, lambda f: f.write(data))
    return path


def figure_array(fig: Figure) -> np.ndarray:
    """The rendered figure as uint8 RGB [H, W, 3]."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def as_hwc(image: torch.Tensor) -> np.ndarray:
    """A uint8 [3, H, W] tensor as the [H, W, 3] array ``imshow`` takes."""
    return image.permute(1, 2, 0).cpu().numpy()
