"""``detfit`` command line: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from detfit.errors import DetfitError
from detfit.predict.defaults import DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_SCORE_THRESHOLD

# Help texts are plain text: rich markup would eat "[tensorboard]" in "pip install
# 'detfit[tensorboard]'". -h is --help everywhere.
HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Fine-tune torchvision detection and instance-segmentation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP,
)
data_app = typer.Typer(
    help="Datasets: check, show, convert, examples, Penn-Fudan download.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=HELP,
)
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from detfit import __version__

        typer.echo(f"detfit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print detfit's version and exit.",
        ),
    ] = False,
) -> None:
    """Fine-tune torchvision detection and instance-segmentation models."""


DataRoot = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder holding PennFudanPed (or PennFudanPed itself)."),
]
Dataset = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Dataset: pennfudan, FORMAT:PATH (coco, voc, yolo, masks) or a dataset .yaml; "
        "see the README.",
    ),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:1, ...")]
Split = Annotated[
    Literal["train", "val", "test"] | None,
    typer.Option(help="Which split of the dataset (default: see the command's help)."),
]
Recipe = Annotated[
    str, typer.Option(help="auto (cpu without a GPU, else tutorial), cpu, tutorial.")
]
TTAScale = Annotated[
    list[float],
    typer.Option(
        "--tta-scale",
        help="With --tta: a size for its views, as a factor of the model's own resize; repeat "
        "for more (e.g. --tta-scale 1 --tta-scale 1.15; default: the tta_scales setting).",
    ),
]
Precision = Annotated[
    str | None,
    typer.Option(
        help="fp32, bf16 (CPUs with AVX-512 BF16/AMX, CUDA) or fp16 (CUDA); docs/speed.md"
    ),
]


@app.command()
def train(
    recipe: Recipe = "auto",
    config: Annotated[
        Path | None, typer.Option(help="YAML file of settings (see config.yaml in a run folder).")
    ] = None,
    data_root: DataRoot = None,
    data: Dataset = None,
    model: Annotated[
        str | None, typer.Option(help="Architecture; `detfit models` lists them.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="default (the registry's pick for this model), DEFAULT (torchvision's best), an "
            "enum name, a .pth file, or none."
        ),
    ] = None,
    weights_backbone: Annotated[
        str | None,
        typer.Option(
            help="Backbone weights: default (the registry's pick), DEFAULT (torchvision's best), "
            "an enum name, a .pth file, or none."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per training batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate.")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loading processes.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<model>[-N]).")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder where its last.pt stopped (mid-epoch too); "
            "with --epochs N, extend a finished run to N epochs."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start over in an --out folder that already holds a run.")
    ] = False,
    set_: Annotated[
        list[str],
        typer.Option("--set", help="Any setting as KEY=VALUE, e.g. model_options.min_size=512."),
    ] = [],  # noqa: B006
    logger: Annotated[
        str | None,
        typer.Option(
            help="none, tensorboard (RUN/tensorboard; pip install 'detfit[tensorboard]') or "
            "mlflow (mlruns/; pip install 'detfit[mlflow]'); several: tensorboard,mlflow."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    time_budget: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="Wall-clock budget, e.g. 30m or 1.5h: plans the epochs (at most --epochs) and "
            "the lr schedule to end in it.",
        ),
    ] = None,
) -> None:
    """Fine-tune (Penn-Fudan by default, or --data), with a COCO evaluation after every epoch."""
    import torch

    from detfit import distributed
    from detfit.config import (
        TrainConfig,
        load_settings,
        merge_settings,
        recipe_config,
        resolve_recipe,
        uncap_for_budget,
    )
    from detfit.engine import Trainer

    say = typer.echo if distributed.env_is_main() else (lambda *a, **k: None)
    given = dict(  # the settings given as flags (None: not given)
        dataset=data,
        data_root=str(data_root) if data_root else None,
        model=model,
        weights=weights,
        weights_backbone=weights_backbone,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        workers=workers,
        device=device,
        out=str(out) if out else None,
        logger=logger.split(",") if logger and "," in logger else logger,
        time_budget=time_budget,
    )
    if resume is not None:
        if config is not None or recipe != "auto" or overwrite:
            raise DetfitError(
                "--resume continues a run with its own settings: --config, --recipe and "
                "--overwrite do not apply (start a new run instead)"
            )
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise DetfitError(f"--resume {resume}: the run continues in its own folder, not --out")
        sets = merge_settings({}, None, set_)
        if any(isinstance(v, dict) for v in sets.values()):
            raise DetfitError(
                f"--resume {resume}: nested settings cannot change when a run continues"
            )
        overrides = {k: v for k, v in {**given, **sets}.items() if v is not None}
        trainer = Trainer(resume=resume, overrides=overrides, progress=not quiet)
        run_dir = trainer.fit()
        say(f"done: {run_dir} (best.pt, last.pt, metrics.csv, config.yaml)")
        return
    if recipe == "auto":
        recipe = resolve_recipe(recipe)
        if recipe == "tutorial":
            say(
                f"GPU found ({torch.cuda.get_device_name()}): using the tutorial's recipe "
                "(maskrcnn_resnet50_fpn, COCO weights, 10 epochs). --recipe cpu runs the CPU one."
            )
        else:
            say(
                "no GPU found: using the CPU recipe (Mask R-CNN on an ImageNet MobileNetV2-FPN "
                "backbone, tuned for 2 cores; see BENCHMARKS.md). --recipe tutorial runs the "
                "tutorial's ResNet-50 recipe instead."
            )
    base = load_settings(config) if config else recipe_config(recipe, uncap=False).to_dict()
    base.pop("out", None)  # a run's own config.yaml names its folder: start a new one
    base.pop("run_id", None)  # and its id: the new run gets its own
    settings = merge_settings(base, given, set_)
    if not config:  # a recipe's epochs do not cap a time budget; the user's (flag, --set) do
        settings = uncap_for_budget(settings, merge_settings({}, given, set_))
    cfg = TrainConfig.from_dict(settings, str(config) if config else "")
    run_dir = Trainer(cfg, overwrite=overwrite, progress=not quiet).fit()
    say(f"done: {run_dir} (best.pt, last.pt, metrics.csv, config.yaml)")


SliceSize = Annotated[
    int | None,
    typer.Option(
        "--slice",
        help="Predict on overlapping square tiles of this side in pixels (plus the whole "
        "image), merged: small objects in large images. See docs/predict.md.",
    ),
]
SliceOverlap = Annotated[float, typer.Option(help="With --slice: share of a tile overlapping.")]
SliceFull = Annotated[
    bool, typer.Option(help="With --slice: also predict the whole image (large objects).")
]


def _slicing(size: int | None, overlap: float, full: bool):
    from detfit.predict.slicing import Slicing

    return Slicing(size, overlap, full) if size is not None else None


@app.command("eval")
def eval_(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT", help="A .pt checkpoint or a run folder (its best.pt)."
        ),
    ],
    data_root: DataRoot = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Evaluate on this dataset instead of the run's test split: its test (or val) "
            "split when it names one, else every image.",
        ),
    ] = None,
    split: Split = None,
    device: Device = "auto",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the stats here.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="COCO metric: faster-coco-eval or pycocotools (default: the run's eval_backend)."
        ),
    ] = None,
    plots: Annotated[
        Path | None,
        typer.Option(
            help="Folder for pr_curve_*.png, confusion_matrix.png and val_predictions.jpg "
            "(default: eval-<checkpoint name> beside the checkpoint)."
        ),
    ] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Write no pictures.")] = False,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Test-time augmentation: the image and its mirror, detections fused (default: "
            "the run's tta setting).",
        ),
    ] = None,
    tta_scale: TTAScale = [],  # noqa: B006
    precision: Precision = None,
    slice_: SliceSize = None,
    overlap: SliceOverlap = DEFAULT_OVERLAP,
    slice_full: SliceFull = True,
) -> None:
    """COCO evaluation of a checkpoint on its run's test split (all 12 numbers per IoU type, and
    AP per class), with PR curves, a confusion matrix and predictions beside ground truth.

    --split scores another split of the run's (or --data's) dataset: train, val or test; on a
    dataset that names no splits (Penn-Fudan), train and test are the two parts of the run's
    seeded split, so --split train shows how far the model fits what it trained on.

    Under torchrun (torchrun --nproc_per_node N -m detfit eval ...) the images are shared out and
    the detections gathered: the same numbers, sooner."""
    from detfit import distributed
    from detfit.eval.saved import default_plots_dir, evaluate_checkpoint, stats_report
    from detfit.fileio import atomic_write_text

    result = evaluate_checkpoint(
        checkpoint,
        data=data,
        split=split,
        data_root=data_root,
        device=device,
        backend=backend,
        plots=None if no_plots else plots or default_plots_dir(checkpoint),
        log=lambda line: typer.echo(line, err=True),
        tta=tta,
        precision=precision,
        slicing=_slicing(slice_, overlap, slice_full),
        tta_scales=tta_scale or None,
    )
    if not distributed.env_is_main():
        return
    report = json.dumps(stats_report(result), indent=2)
    typer.echo(report)
    if json_out:
        atomic_write_text(json_out, report)


@app.command()
def plot(
    runs: Annotated[
        list[Path], typer.Argument(metavar="RUN", help="Run folders (or their metrics.csv).")
    ],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Image file to write (default: compare.png in the runs' folder).",
        ),
    ] = None,
) -> None:
    """Loss and AP curves per epoch of one or several runs on one figure, to compare them."""
    from detfit.plots.curves import plot_run_folders

    typer.echo(f"wrote {plot_run_folders(runs, file)}")


@app.command()
def tune(
    search: Annotated[
        Path, typer.Argument(metavar="SEARCH", help="Search file: base, space, metric, pruner.")
    ],
    out: Annotated[Path | None, typer.Option(help="Study folder (default studies/<name>).")] = None,
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials wanted in the study, in all.")
    ] = 20,
    time: Annotated[
        str | None,
        typer.Option(
            help="Wall-clock budget of this run of the study, all trials together, as train's "
            "--time takes it: 30m, 1.5h, 900s."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Trials at once (processes).")] = 1,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna RDB URL shared by several machines (default: SQLite in --out)."),
    ] = None,
) -> None:
    """Search settings with Optuna: trials as run folders, pruned per epoch; best.yaml at the end.
    Running the same command again continues the study (see docs/experiments.md)."""
    from detfit.config import parse_duration
    from detfit.experiments.tune import tune as run_study

    minutes = None
    if time is not None:
        try:
            minutes = parse_duration(time) / 60
        except ValueError as exc:
            raise DetfitError(f"--time {time}: {exc}") from None
    run_study(
        search, out, trials=trials, minutes=minutes, jobs=jobs, storage=storage, log=typer.echo
    )


@app.command()
def runs(
    folder: Annotated[
        Path, typer.Argument(metavar="FOLDER", help="Folder of run folders (any depth).")
    ] = Path("runs"),
    sort: Annotated[str, typer.Option(help="Column to sort by (best: highest first).")] = "best",
    csv: Annotated[bool, typer.Option("--csv", help="CSV instead of aligned columns.")] = False,
) -> None:
    """Runs side by side: best metric and epoch, minutes, model, the settings that differ."""
    from detfit.experiments.runs import format_csv, format_table, runs_table

    rows = runs_table(folder, sort)
    typer.echo(format_csv(rows) if csv else format_table(rows), nl=not csv)


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL",
            help="A .pt checkpoint, a run folder (its best.pt), an .onnx or a TorchScript file.",
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT", help="Image files, folders (recursive), globs, video files."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default: a new runs/predict-N)."),
    ] = None,
    score_threshold: Annotated[
        float, typer.Option(help="Keep detections scoring at least this.")
    ] = DEFAULT_SCORE_THRESHOLD,
    classes: Annotated[
        list[str],
        typer.Option("--classes", help="Keep only these classes (names or category ids)."),
    ] = [],  # noqa: B006
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = DEFAULT_BATCH_SIZE,
    coco_json: Annotated[
        Path | None,
        typer.Option("--coco-json", help="Also write every image's detections as COCO results."),
    ] = None,
    image_ids: Annotated[
        Path | None,
        typer.Option("--image-ids", help="COCO file whose images give --coco-json its image ids."),
    ] = None,
    device: Device = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the outputs of an earlier prediction in --out.")
    ] = False,
    tta: Annotated[
        bool, typer.Option("--tta", help="Test-time augmentation: the image and its mirror, fused.")
    ] = False,
    tta_scale: TTAScale = [],  # noqa: B006
    precision: Precision = None,
    slice_: SliceSize = None,
    overlap: SliceOverlap = DEFAULT_OVERLAP,
    slice_full: SliceFull = True,
    track: Annotated[
        bool,
        typer.Option(
            help="Videos: follow objects (ByteTrack), a track_id per detection, tracks counted "
            "per class (pip install 'detfit[track]')."
        ),
    ] = False,
) -> None:
    """Draw masks, boxes, classes and scores; write <name>.png and <name>.json per image (videos:
    <name>.mp4 and <name>.jsonl per frame). Unusable inputs are one line each; exit 1 if any."""
    from detfit.predict import predict_inputs

    out = out or _default_predict_out()
    summary = predict_inputs(
        model,
        inputs,
        out,
        batch_size=batch_size,
        score_threshold=score_threshold,
        classes=classes or None,
        device=device,
        coco_json=coco_json,
        image_ids=image_ids,
        overwrite=overwrite,
        progress=not quiet,
        log=lambda line: typer.echo(line, err=True),
        tta=tta,
        precision=precision,
        slicing=_slicing(slice_, overlap, slice_full),
        track=track,
        tta_scales=tta_scale or None,
    )
    frames = f", {summary.frames} video frames" if summary.frames else ""
    typer.echo(f"{summary.images} images{frames}: wrote {len(summary.written)} files to {out}")
    for video, counts in summary.tracks.items():
        found = ", ".join(f"{n} {name}" for name, n in counts.items()) or "none"
        typer.echo(f"{video}: tracks per class: {found}")
    if summary.problems:
        typer.echo(f"detfit: {len(summary.problems)} input(s) skipped (above)", err=True)
        raise typer.Exit(1)


def _default_predict_out() -> Path:
    from detfit.predict.run import default_out

    return default_out()


@app.command()
def export(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT", help="A .pt checkpoint or a run folder (its best.pt)."
        ),
    ],
    format_: Annotated[
        str, typer.Option("--format", help="onnx or torchscript (not needed with --strip).")
    ] = "onnx",
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="File to write (default beside the checkpoint: .onnx / .torchscript.pt; "
            "with --strip it is required).",
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    images: Annotated[
        list[Path],
        typer.Option(
            "--images", help="Images for the parity check (default: the run's test split)."
        ),
    ] = [],  # noqa: B006
    check: Annotated[
        bool, typer.Option(help="Compare with eager torch; a mismatch exits 1, no file kept.")
    ] = True,
    strip: Annotated[
        bool, typer.Option(help="Write a weights-only checkpoint (--file) instead.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(help="int8: ONNX Runtime static quantization, checked by AP (docs/speed.md)."),
    ] = None,
    calibration_images: Annotated[
        list[Path],
        typer.Option(help="Images (files or folders) to calibrate int8 (default: training split)."),
    ] = [],  # noqa: B006
    max_ap_drop: Annotated[
        float, typer.Option(help="int8: refuse (exit 2) if AP drops by more than this.")
    ] = 0.01,
    box_tolerance: Annotated[
        float | None,
        typer.Option(
            help="Parity: the largest box difference from eager torch that passes, in pixels "
            "(default: the check's own, docs/export.md)."
        ),
    ] = None,
) -> None:
    """Export to ONNX or TorchScript (dynamic height/width, classes inside) with a parity check."""
    from detfit.checkpoint import strip_checkpoint
    from detfit.export import ParityError, export_model

    if strip:
        if file is None:
            raise DetfitError("--strip needs --file FILE.pt")
        path, before, after = strip_checkpoint(checkpoint, file)
        typer.echo(f"wrote {path}: {after / 2**20:.1f} MiB (was {before / 2**20:.1f} MiB)")
        return
    try:
        path, report = export_model(
            checkpoint,
            format_,
            file,
            opset,
            images,
            check,
            log=typer.echo,
            quantize=quantize,
            calibration_images=calibration_images,
            max_ap_drop=max_ap_drop,
            box_tolerance=box_tolerance,
        )
    except ParityError as exc:
        typer.echo(f"detfit: parity check failed: {exc}", err=True)
        raise typer.Exit(1) from None
    checked = f"parity ok on {len(report)} images" if report else "not checked (--no-check)"
    if quantize and check:
        checked = f"AP within {max_ap_drop:g} of fp32"
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); {checked}")


@app.command()
def serve(
    model: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="As predict: run folder, .pt, TorchScript, .onnx."),
    ],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens it to others.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Device = "auto",
    threads: Annotated[int | None, typer.Option(help="Threads per worker.")] = None,
    workers: Annotated[int, typer.Option(help="Processes, each with its own model.")] = 1,
    max_batch: Annotated[int, typer.Option(help="Requests per model call at most.")] = 4,
    max_wait_ms: Annotated[float, typer.Option(help="Wait for a batch to fill (ms).")] = 5.0,
    max_bytes: Annotated[int, typer.Option(help="Largest upload (413 above).")] = 20 * 2**20,
    max_pixels: Annotated[int, typer.Option(help="Largest image, W x H (413).")] = 40_000_000,
    api_key: Annotated[
        str | None, typer.Option(envvar="DETFIT_API_KEY", help="Key asked of /v1 and /metrics.")
    ] = None,
    cors: Annotated[
        list[str], typer.Option("--cors", help="Allow this browser origin (repeat for more).")
    ] = [],  # noqa: B006
    score_threshold: Annotated[
        float, typer.Option(help="Default of a request.")
    ] = DEFAULT_SCORE_THRESHOLD,
    slice_: SliceSize = None,
    overlap: SliceOverlap = DEFAULT_OVERLAP,
    slice_full: SliceFull = True,
) -> None:
    """Serve MODEL over HTTP: POST /v1/predict, GET /v1/model, /health, /metrics and a web page
    at / (see docs/serve.md). Needs the serve extra of detfit's package."""
    from detfit.serve.runner import serve as run_server
    from detfit.serve.settings import ServeSettings

    settings = ServeSettings.parse(
        model=str(model), host=host, port=port, device=device, threads=threads, workers=workers,
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_bytes=max_bytes, max_pixels=max_pixels,
        api_key=api_key, cors=cors, score_threshold=score_threshold, slice_size=slice_,
        slice_overlap=overlap, slice_full=slice_full,
    )  # fmt: skip
    run_server(settings, log=lambda line: typer.echo(line, err=True))


@data_app.command("pennfudan")
def data_pennfudan(
    data_root: DataRoot = None,
    download: Annotated[
        bool, typer.Option(help="Download into the cache when no copy is found.")
    ] = True,
) -> None:
    """Download (or find), verify and summarise Penn-Fudan."""
    from detfit.data.pennfudan import resolve_pennfudan, summarize_pennfudan

    root = resolve_pennfudan(data_root, download=download)
    summary = summarize_pennfudan(root)
    typer.echo(f"Penn-Fudan at {root}: verified")
    for key, value in summary.items():
        typer.echo(f"  {key}: {value}")


DatasetArg = Annotated[
    str,
    typer.Argument(
        metavar="DATASET", help="pennfudan, FORMAT:PATH (coco, voc, yolo, masks) or a .yaml file."
    ),
]


@data_app.command("check")
def data_check(
    dataset: DatasetArg,
    split: Split = None,
    annotations_only: Annotated[
        bool, typer.Option(help="Check the annotations only, without opening the images.")
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(help="Read image headers only (size, mode, EXIF), not every pixel."),
    ] = False,
) -> None:
    """Counts per class, sizes, and every problem with its file; exit 1 if training would fail.

    Every split the dataset names is checked (--split: only that one); every image is decoded in
    full (a truncated file is an error), as training reads it."""
    from tqdm.auto import tqdm

    from detfit.data import DatasetSpec, check, summary

    spec = DatasetSpec.parse(dataset)
    splits = spec.splits
    if split is not None:
        if split not in splits:
            raise DetfitError(f"{dataset}: no {split} split (it has {', '.join(splits)})")
        splits = ["train", split] if split != "train" else ["train"]  # train gives the classes
    classes = None
    fatal = repaired = 0
    for name in splits:
        annotations = spec.read(name, classes)
        classes = classes or annotations.classes
        if split is not None and name != split:
            continue
        typer.echo(f"[{name}] " + "\n".join(summary(annotations)))
        if name == "train":
            from detfit.data.adapt import recipe_report

            for line in recipe_report(annotations):
                typer.echo(f"  {line}")
        problems = check(
            annotations,
            not annotations_only,
            lambda it, total: tqdm(it, total=total, desc="checking", leave=False),
            decode=not quick,
            train=name == "train",
        )
        for problem in problems:
            typer.echo(f"  {problem}")
        fatal += sum(p.fatal for p in problems)
        repaired += sum(not p.fatal for p in problems)
    typer.echo(
        f"{fatal} error(s) that stop training, {repaired} warning(s) repaired when training reads "
        "the data"
    )
    if fatal:
        raise typer.Exit(1)


@data_app.command("show")
def data_show(
    dataset: DatasetArg,
    out: Annotated[
        Path | None, typer.Option(help="Folder to write into (default: a new runs/data-show).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Images on the contact sheet.")] = 16,
    split: Split = None,
    seed: Annotated[int, typer.Option(help="Seed of the images chosen.")] = 0,
    augment: Annotated[
        bool,
        typer.Option(
            "--augment",
            help="Also write augmented.jpg: training images as augmentation changes them "
            "(choose it with --set augment=lsj --set copy_paste=0.5 ...).",
        ),
    ] = False,
    set_: Annotated[
        list[str], typer.Option("--set", help="With --augment: a training setting as KEY=VALUE.")
    ] = [],  # noqa: B006
) -> None:
    """Look at a dataset: samples.jpg (N images with boxes, masks and class names drawn) and
    labels.png (instances per class, box sizes, aspect ratios, where box centres fall), of the
    train split unless --split names another."""
    from detfit.plots.dataset import show_augmented, show_dataset

    if out is None:
        from detfit.engine.run_folder import new_run_dir

        out = new_run_dir("data-show")
    paths = show_dataset(dataset, out, n=n, split=split or "train", seed=seed)
    if augment:
        from detfit.config import merge_settings

        paths += show_augmented(dataset, out, merge_settings({}, None, set_), n=n, seed=seed)
    for path in paths:
        typer.echo(f"wrote {path}")


@data_app.command("convert")
def data_convert(
    dataset: DatasetArg,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output file, e.g. instances.json.")],
    to: Annotated[str, typer.Option(help="Output format (coco).")] = "coco",
    split: Split = None,
) -> None:
    """Write a dataset (its train split unless --split names another) as a COCO instances file
    that pycocotools loads."""
    from detfit.data import DatasetSpec, write_coco

    if to != "coco":
        raise DetfitError(f"--to {to}: only coco is supported as an output format")
    spec = DatasetSpec.parse(dataset)
    split = split or "train"
    classes = spec.read("train").classes if split != "train" else None
    written = write_coco(spec.read(split, classes), out)
    typer.echo(
        f"wrote {out}: {len(written['images'])} images, {len(written['annotations'])} "
        f"annotations, {len(written['categories'])} categories"
    )


@data_app.command("example")
def data_example(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the examples into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 24,
) -> None:
    """Write one small synthetic 3-class dataset in every format (COCO, VOC, YOLO, YOLO-seg, masks)."""
    from detfit.data.synthetic import write_all_formats

    for name, path in write_all_formats(out, num_images=n).items():
        fmt = name.removesuffix("-seg")
        typer.echo(f"{name:9s} detfit data check {fmt}:{path}")


@app.command()
def settings(recipe: Recipe = "auto") -> None:
    """Every setting (config.yaml key, --set KEY=VALUE) with its type, the value the recipe gives
    it (by default the recipe `detfit train` would use on this machine) and its meaning."""
    from detfit.config import resolve_recipe, settings_table

    name = resolve_recipe(recipe)
    rows = settings_table(name)
    typer.echo(f"recipe {name}" + (" (auto on this machine)" if recipe == "auto" else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    header = zip(("setting", "type", name), widths)
    typer.echo("  ".join(f"{h:{w}}" for h, w in header) + "  meaning")
    for row in rows:
        typer.echo("  ".join(f"{v:{w}}" for v, w in zip(row, widths)) + f"  {row[3]}")


@app.command()
def models(
    speed: Annotated[
        bool, typer.Option(help="Show the measured CPU cost per architecture (BENCHMARKS.md).")
    ] = False,
) -> None:
    """List every architecture and backbone: COCO AP, size, GFLOPS, and whether it runs offline."""
    from detfit.models.catalog import render, speed_table, tables

    if speed:
        typer.echo(render(speed_table()))
        return
    typer.echo("\n\n".join(render(t) for t in tables()))
    typer.echo(
        "\nAP: COCO val2017 (torchvision's metadata); offline: the weights file is in the torch "
        "hub cache; situation A models also take --weights none --weights-backbone DEFAULT."
    )


def user_message(exc: BaseException) -> str:
    """The message of a user error; one re-raised by a DataLoader worker (whose text embeds the
    worker's traceback) is shortened to the worker's own message."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def main() -> None:
    """Console entry point: user errors are one line (one per problem) on stderr, exit code 2;
    a stopped run one line saying how to resume, with 128 + the signal's number."""
    from detfit import refusal
    from detfit.distributed import env_is_main
    from detfit.errors import Interrupted

    try:
        refusal.refuse_if_refused_before()  # a torchrun restart of a refused request
        app()
    except Interrupted as exc:
        if env_is_main():
            typer.echo(f"detfit: {exc}", err=True)
        sys.exit(exc.exit_code)
    except DetfitError as exc:
        message = user_message(exc)
        refusal.record(message)  # final for the torchrun launch: its restarts refuse at once
        if refusal.says_it(exc):  # rank 0 says it, once for the whole torchrun job
            for line in message.splitlines() or [type(exc).__name__]:
                typer.echo(f"detfit: error: {line}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("detfit: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
