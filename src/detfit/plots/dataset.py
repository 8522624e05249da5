"""``detfit data show``: a contact sheet of samples with their ground truth, and ``labels.png``
(instances per class, box sizes, aspect ratios, where box centres fall), for any dataset spec.

The statistics come from the split as a COCO dict (:func:`~detfit.data.export.to_coco`, what
``detfit data convert`` writes), so every format is described the same way and images are not
decoded for them (mask folders: only their mask PNGs).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from detfit.plots.figure import new_figure, save_figure
from detfit.plots.gallery import Sample, as_uint8, file_name, plot_samples
from detfit.predict.overlay import class_colour

# COCO's small / medium / large boundaries (sqrt of the area, pixels): where APs/APm/APl split.
COCO_SIZE_LIMITS = (32, 96)
CENTRE_BINS = 24


def box_statistics(coco: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per non-crowd annotation with a box: ``label`` (its category id), ``size`` (sqrt of the box
    area, px), ``aspect`` (width / height), ``cx``/``cy`` (centre as a share of the image)."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    rows = []
    for ann in coco["annotations"]:
        if ann.get("iscrowd") or "bbox" not in ann:
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        width, height = sizes[ann["image_id"]]
        rows.append(
            (ann["category_id"], np.sqrt(w * h), w / h, (x + w / 2) / width, (y + h / 2) / height)
        )
    data = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    names = ("label", "size", "aspect", "cx", "cy")
    return {name: data[:, k] for k, name in enumerate(names)}


def plot_labels(coco: dict[str, Any], title: str = "") -> Figure:
    """Four panels: instances per category (in ``coco["categories"]`` order, coloured as the
    overlays colour labels 1, 2, ...), box size and aspect-ratio histograms (log scales), and a
    heat map of box centres in image coordinates."""
    stats = box_statistics(coco)
    categories = coco["categories"]
    counts = [int((stats["label"] == c["id"]).sum()) for c in categories]
    names = [str(c["name"]) for c in categories]
    many = len(names) > 8  # many names read better along the y axis
    with new_figure(13.0, max(3.6, 0.22 * len(names) + 1.2) if many else 3.6) as fig:
        ax_count, ax_size, ax_aspect, ax_centre = fig.subplots(1, 4)
        colours = [tuple(c / 255 for c in class_colour(k)) for k in range(1, len(names) + 1)]
        if many:
            ax_count.barh(names, counts, color=colours)
            ax_count.invert_yaxis()
            ax_count.set_xlabel("instances")
        else:
            bars = ax_count.bar(names, counts, color=colours)
            ax_count.bar_label(bars, fontsize=8)
            ax_count.set_ylabel("instances")
            ax_count.tick_params(axis="x", labelrotation=30 if len(names) > 3 else 0)
        ax_count.set_title(f"instances per class ({sum(counts)})")
        ax_count.grid(axis="y" if many else "x", visible=False)
        (ax_count.xaxis if many else ax_count.yaxis).set_major_locator(MaxNLocator(integer=True))
        sizes = stats["size"]
        low = min(8.0, sizes.min() / 1.2) if len(sizes) else 8.0
        high = max(512.0, sizes.max() * 1.2) if len(sizes) else 512.0
        ax_size.hist(sizes, bins=np.geomspace(low, high, 40), color="tab:blue")
        for limit, name in zip(COCO_SIZE_LIMITS, ("S|M", "M|L")):
            ax_size.axvline(limit, color="black", linestyle=":", linewidth=1)
            ax_size.text(limit, 0.98, f" {name}", transform=ax_size.get_xaxis_transform(), va="top")
        _log_axis(ax_size, [2**k for k in range(0, 14)], low, high)
        ax_size.set(xlabel="sqrt(box area), px (COCO: S|M at 32, M|L at 96)", ylabel="boxes")
        ax_size.set_title("box size")
        ax_aspect.hist(stats["aspect"], bins=np.geomspace(0.05, 20, 41), color="tab:green")
        ax_aspect.axvline(1.0, color="black", linestyle=":", linewidth=1)
        _log_axis(ax_aspect, [0.1, 0.25, 0.5, 1, 2, 4, 10], 0.05, 20)
        ax_aspect.set(xlabel="width / height", ylabel="boxes", title="aspect ratio")
        edges = np.linspace(0, 1, CENTRE_BINS + 1)
        heat, _, _ = np.histogram2d(stats["cy"], stats["cx"], bins=[edges, edges])
        image = ax_centre.imshow(heat, extent=(0, 1, 1, 0), cmap="viridis", interpolation="nearest")
        ax_centre.grid(False)
        ax_centre.set(xlabel="x / image width", ylabel="y / image height", title="box centres")
        fig.colorbar(
            image, ax=ax_centre, shrink=0.85, label="boxes", ticks=MaxNLocator(integer=True)
        )
        if title:
            fig.suptitle(title)
    return fig


def _log_axis(ax: Axes, ticks: Sequence[float], low: float, high: float) -> None:
    """A log x axis labelled with plain numbers (``ticks`` within [low, high]), no minor labels."""
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_xticks(
        [t for t in ticks if low <= t <= high], [f"{t:g}" for t in ticks if low <= t <= high]
    )
    ax.xaxis.set_minor_formatter(NullFormatter())


def dataset_samples(annotations: Any, indices: Sequence[int]) -> list[Sample]:
    """The images at ``indices`` of an :class:`~detfit.data.records.AnnotatedSet` with their
    targets as evaluation reads them (crowd regions kept)."""
    from detfit.data.detection import DetectionDataset

    dataset = DetectionDataset(annotations)
    samples = []
    for i in indices:
        image, target = dataset[i]
        samples.append(Sample(as_uint8(image), target, file=file_name(dataset, i)))
    return samples


def show_dataset(
    spec: str, out: str | Path, n: int = 16, split: str = "train", seed: int = 0
) -> list[Path]:
    """Write ``samples.jpg`` (``n`` images of ``split`` chosen with ``seed``, ground truth drawn)
    and ``labels.png`` (statistics of the whole split) into ``out``; returns the files."""
    from detfit.data import DatasetSpec
    from detfit.data.export import to_coco

    parsed = DatasetSpec.parse(spec)
    classes = parsed.read("train").classes if split != "train" else None
    annotations = parsed.read(split, classes)
    total = len(annotations.images)
    indices = sorted(random.Random(seed).sample(range(total), min(n, total)))
    out = Path(out)
    what = f"{spec} [{split}]"
    sheet = plot_samples(
        dataset_samples(annotations, indices),
        annotations.classes,
        f"{what}: {len(indices)} of {total} images, ground truth",
    )
    coco = to_coco(annotations, out)
    labels = plot_labels(
        coco,
        f"{what}: {total} images, {len(coco['annotations'])} annotations",
    )
    return [save_figure(sheet, out / "samples.jpg"), save_figure(labels, out / "labels.png")]


def show_augmented(
    spec: str, out: str | Path, settings: dict[str, Any], n: int = 16, seed: int = 0
) -> list[Path]:
    """Write ``augmented.jpg``: ``n`` training images of ``spec`` as the first epoch of a run
    with ``settings`` (augment, copy_paste, hflip_prob, ...) and ``seed`` would see them, drawn
    with their targets after augmentation. Returns the file."""
    from detfit.config import TrainConfig
    from detfit.data.copy_paste import CopyPaste
    from detfit.data.loaders import build_datasets
    from detfit.data.sampling import PerItemSeed

    cfg = TrainConfig.from_dict({**settings, "dataset": spec, "seed": seed})
    data = build_datasets(cfg, log=lambda line: None)
    items = PerItemSeed(data.train, cfg.seed)
    plain = data.train.dataset if isinstance(data.train, CopyPaste) else data.train
    total = len(items)
    indices = sorted(random.Random(seed).sample(range(total), min(n, total)))
    samples = []
    for i in indices:
        image, target = items[i]
        samples.append(Sample(as_uint8(image), target, file=file_name(plain, i)))
    policy = f"augment {cfg.augment}" + (
        f", copy_paste {cfg.copy_paste:g}" if cfg.copy_paste else ""
    )
    title = f"{spec} [train]: {len(indices)} of {total} images as training sees them ({policy})"
    sheet = plot_samples(samples, data.classes, title)
    return [save_figure(sheet, Path(out) / "augmented.jpg")]
