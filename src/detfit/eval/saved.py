"""Score a saved checkpoint: what ``detfit eval`` runs, in one process or under torchrun."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detfit import distributed
from detfit.errors import DetfitError
from detfit.eval.assembly import evaluate_run, prepare_model
from detfit.eval.loop import EvaluationResult

if TYPE_CHECKING:
    from detfit.predict.slicing import Slicing

# Where the images scored come from, as Datasets.held_out names it, in words.
SCORED = {
    "split": "the run's held-out split",
    "split-train": "the run's training images (the seeded split's other part)",
    "train": "the train split of",
    "val": "the val split of",
    "test": "the test split of",
    "all": "every image of",
}


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    verbose: bool = True,
    backend: str | None = None,
    plots: str | Path | None = None,
    log: Callable[[str], None] = print,
    tta: bool | None = None,
    precision: str | None = None,
    slicing: Slicing | None = None,
    tta_scales: Sequence[float] | None = None,
) -> EvaluationResult:
    """COCO evaluation of ``checkpoint`` on its run's test split, or on ``data`` (its test or
    val split when it names one, else every image), or on the ``split`` named (train, val,
    test; on a dataset that names none, train and test are the seeded split's parts).

    ``backend``: the COCO metric (None: the run's ``eval_backend``); ``verbose`` prints the
    metric's summary table per IoU type (not its index-building chatter); ``plots`` names a
    folder for the PR curves, confusion matrix and ``val_predictions.jpg``; ``log`` gets one line
    saying which images are scored; ``tta``: with test-time augmentation (None: as the run's
    ``tta`` setting) at ``tta_scales`` (None: the run's); ``precision`` (fp32, bf16, fp16)
    overrides the run's own (its precision/amp settings); ``slicing`` scores sliced inference
    (:mod:`detfit.predict.slicing`) with the same metric.

    Under torchrun each rank scores its share of the images and rank 0 gathers them: the stats
    (on every rank) equal a single-process evaluation of the same weights.
    """
    from detfit.checkpoint import load_model
    from detfit.config import TrainConfig, check_setting
    from detfit.data.loaders import build_datasets, build_loaders

    if backend is not None:
        check_setting("eval_backend", backend, "--backend")  # before the (slow) checkpoint is read
    if tta_scales is not None:
        tta_scales = check_setting("tta_scales", list(tta_scales), "--tta-scale")
    from detfit.predict.predictor import TTA_SCALES_ALONE, TTA_WITH_SLICES

    if tta and slicing is not None:
        raise DetfitError(TTA_WITH_SLICES)
    dev = distributed.resolve_device(device)
    loaded = load_model(checkpoint, dev)
    if loaded.config is None:
        raise DetfitError(
            f"{loaded.path}: holds no run settings (config), so nothing says what data to score"
        )
    cfg = TrainConfig.from_dict(loaded.config, str(checkpoint))
    if data_root:
        cfg.data_root = str(data_root)
    if data:
        cfg.dataset = data
    if backend is not None:
        cfg.eval_backend = backend
    if precision is not None:
        cfg.precision = precision
    if tta_scales is not None:
        if not (cfg.tta if tta is None else tta):
            raise DetfitError(TTA_SCALES_ALONE)
        cfg.tta_scales = tta_scales
    main = distributed.is_main
    with distributed.process_group(dev):
        with distributed.main_first():
            datasets = build_datasets(
                cfg, log=lambda line: None, held_out="all" if data else "test", split=split
            )
        classes = loaded.classes
        if classes and datasets.classes != classes:
            raise DetfitError(
                f"{cfg.dataset}: classes {datasets.classes[1:]} differ from the checkpoint's "
                f"{classes[1:]}"
            )
        loaders = build_loaders(cfg, datasets, distributed.rank(), distributed.world_size())
        model = loaded.model
        dtype = prepare_model(model, cfg, dev, log if main() else lambda line: None)
        source = "" if datasets.held_out.startswith("split") else f" {cfg.dataset}"
        scored = f"{SCORED[datasets.held_out]}{source}"
        if slicing is not None:
            scored += f", sliced in {slicing.size} px tiles"
            scored += "" if slicing.full else " (no whole-image pass)"
            if cfg.tta and tta is None:  # the run's own setting gives way to the asked slicing
                scored += ", without the run's test-time augmentation"
                tta = False
        if main():  # only now: a checkpoint that does not load is one line, this one is not
            log(f"scoring {len(datasets.test)} images: {scored}")
        result = evaluate_run(
            model,
            loaders.test,
            cfg,
            dev,
            classes=datasets.classes,
            keypoint_names=loaded.keypoint_names,
            autocast_dtype=dtype,
            progress=progress,
            tta=tta,
            slicing=slicing,
        )
        if main() and verbose:
            for iou_type, coco_eval in result.coco_eval.items():
                print(f"{iou_type}:")
                coco_eval.summarize()
        if main() and plots is not None:
            from detfit.plots import evaluation_figures, write_figures

            title = f"{checkpoint}, {scored}"
            figures = evaluation_figures(result, datasets.classes, title, datasets.test)
            try:
                for path in write_figures(figures, plots):
                    log(f"wrote {path}")
            except DetfitError as exc:  # the numbers are still worth having
                log(f"no pictures: {exc}")
        return result


def default_plots_dir(checkpoint: str | Path) -> Path:
    """``eval-<name>`` beside the checkpoint scored (a run folder: its best.pt, or last.pt before
    any epoch was best), e.g. ``runs/x/eval-best/``."""
    from detfit.checkpoint import run_checkpoint

    path = run_checkpoint(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint)
    return path.parent / f"eval-{path.stem}"


def stats_report(result: EvaluationResult) -> dict[str, dict[str, float]]:
    """Per IoU type, the 12 COCO numbers then ``AP/<class>`` (IoU 0.50:0.95; -1 for a class
    without ground truth): what ``detfit eval`` prints and ``--json`` writes, named as
    ``metrics.json``'s ``bbox_AP/<class>`` columns are."""
    report: dict[str, dict[str, Any]] = {}
    for iou_type, stats in result.stats.items():
        per_class = result.per_class.get(iou_type, {})
        report[iou_type] = {**stats, **{f"AP/{name}": ap for name, ap in per_class.items()}}
    return report
