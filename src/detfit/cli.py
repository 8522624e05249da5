"""``detfit`` command line: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from detfit.errors import DetfitError

app = typer.Typer(
    help="Fine-tune torchvision detection and instance-segmentation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: download, verify, summarise.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataRoot = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder holding PennFudanPed (or PennFudanPed itself)."),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:1, ...")]


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def _apply_sets(data: dict[str, Any], sets: list[str]) -> None:
    """``--set key=value`` (YAML value); ``model_options.min_size=512`` reaches nested settings."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise DetfitError(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value)


@app.command()
def train(
    recipe: Annotated[
        str, typer.Option(help="auto (cpu without a GPU, else tutorial), cpu, tutorial.")
    ] = "auto",
    config: Annotated[
        Path | None, typer.Option(help="YAML file of settings (see config.yaml in a run folder).")
    ] = None,
    data_root: DataRoot = None,
    model: Annotated[
        str | None, typer.Option(help="Architecture; `detfit models` lists them.")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="DEFAULT, an enum name, a .pth file, or none.")
    ] = None,
    weights_backbone: Annotated[
        str | None, typer.Option(help="Backbone weights: enum name, file, or none.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per training batch.")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate.")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loading processes.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<model>[-N]).")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder at its next epoch.")
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option("--set", help="Any setting as KEY=VALUE, e.g. model_options.min_size=512."),
    ] = [],  # noqa: B006
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Fine-tune on Penn-Fudan, with a COCO evaluation (bbox, segm) after every epoch."""
    import torch

    from detfit.config import RECIPES, TrainConfig, recipe_config
    from detfit.engine import fit

    if resume is not None:
        run_dir = fit(resume=resume, progress=not quiet)
        typer.echo(f"done: {run_dir}")
        return
    if recipe == "auto":
        recipe = "tutorial" if torch.cuda.is_available() else "cpu"
        if recipe == "cpu":
            typer.echo(
                "no GPU found: using the CPU recipe (Mask R-CNN on an ImageNet MobileNetV2-FPN "
                "backbone, tuned for 2 cores; see BENCHMARKS.md). --recipe tutorial runs the "
                "tutorial's ResNet-50 recipe instead."
            )
    if recipe not in RECIPES:
        raise DetfitError(f"unknown recipe {recipe!r}; choose auto, {', '.join(RECIPES)}")
    data = TrainConfig.load(config).to_dict() if config else recipe_config(recipe).to_dict()
    overrides = dict(
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
    )
    data.update({k: v for k, v in overrides.items() if v is not None})
    _apply_sets(data, set_)
    cfg = TrainConfig.from_dict(data, "--set")
    run_dir = fit(cfg, progress=not quiet)
    typer.echo(f"done: {run_dir} (best.pt, last.pt, metrics.csv, config.yaml)")


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A .pt checkpoint or a run folder.")],
    data_root: DataRoot = None,
    device: Device = "auto",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the stats here.")
    ] = None,
) -> None:
    """COCO evaluation of a checkpoint on its run's test split (all 12 numbers per IoU type)."""
    from detfit.config import TrainConfig
    from detfit.engine.builders import build_datasets, build_loaders
    from detfit.engine.checkpoint import load_checkpoint
    from detfit.engine.loop import evaluate
    from detfit.engine.trainer import resolve_device
    from detfit.fileio import atomic_write_text
    from detfit.models import rebuild_model

    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"], str(checkpoint))
    if data_root:
        cfg.data_root = str(data_root)
    data = build_datasets(cfg)
    _, test_loader = build_loaders(cfg, data)
    dev = resolve_device(device)
    model = rebuild_model(ckpt["model_info"], ckpt["model"]).to(dev)
    result = evaluate(model, test_loader, dev, classes=data.classes, verbose=True)
    typer.echo(json.dumps(result.stats, indent=2))
    if json_out:
        atomic_write_text(json_out, json.dumps(result.stats, indent=2))


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A .pt checkpoint or a run folder.")],
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for <image>.png overlays and <image>.json.")
    ],
    score_threshold: Annotated[
        float, typer.Option(help="Keep detections scoring at least this.")
    ] = 0.5,
    device: Device = "auto",
) -> None:
    """Draw masks, boxes, class names and scores on each image; write detections as JSON."""
    from detfit.predict import predict_files

    written = predict_files(checkpoint, images, out, score_threshold, device)
    typer.echo(f"wrote {len(written)} files to {out}")


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


@app.command()
def models() -> None:
    """List every architecture and backbone: COCO AP, size, GFLOPS, and whether it runs offline."""
    from detfit.models.catalog import render, tables

    typer.echo("\n\n".join(render(t) for t in tables()))
    typer.echo(
        "\nAP: COCO val2017 (torchvision's metadata); offline: the weights file is in the torch "
        "hub cache; situation A models also take --weights none --weights-backbone DEFAULT."
    )


def main() -> None:
    """Console entry point: user errors are one line on stderr and exit code 2."""
    try:
        app()
    except DetfitError as exc:
        typer.echo(f"detfit: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("detfit: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
