"""The main job: train with a COCO evaluation after every epoch, writing a run folder.

runs/<name>/  config.yaml  metrics.csv  metrics.json  last.pt  best.pt
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detfit.config import TrainConfig
from detfit.engine.builders import (
    Datasets,
    build_datasets,
    build_loaders,
    build_optimizer,
    build_scheduler,
)
from detfit.engine.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from detfit.engine.ema import ema_model
from detfit.engine.loop import evaluate, iou_types_for, train_one_epoch
from detfit.errors import DetfitError
from detfit.fileio import atomic_write_text
from detfit.models import build_model, get_spec, model_info, rebuild_model
from detfit.models.situation_b import MASK_HEAD_OPTIONS
from detfit.paths import DEFAULT_RUNS_DIR


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def new_run_dir(name: str, root: Path = DEFAULT_RUNS_DIR) -> Path:
    """``runs/<name>``, ``runs/<name>-2``, ... whichever is free first."""
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        if not path.exists():
            return path
    raise RuntimeError(f"no free run folder under {root}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


def flatten_metrics(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{iou}_{name}": value for iou, s in stats.items() for name, value in s.items()}


def flatten_per_class(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    """``bbox_AP/<class>``: per-class AP (IoU 0.50:0.95), -1 where a class has no ground truth."""
    return {f"{iou}_AP/{name}": ap for iou, aps in per_class.items() for name, ap in aps.items()}


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "metrics.json", json.dumps(history, indent=2))
    fields = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def options_for_data(
    cfg: TrainConfig, data: Datasets, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The model options, completed by what the data decides (the number of keypoints).

    A recipe tuned for a mask model (the CPU recipe) stays usable with ``--model`` set to a box
    model: its mask-head options are dropped, with one line saying so.
    """
    options = dict(cfg.model_options)
    spec = get_spec(cfg.model)
    dropped = [k for k in MASK_HEAD_OPTIONS if k in options and not spec.has_masks]
    if dropped:
        log(f"{cfg.model} has no mask head: ignoring {', '.join(dropped)}")
        options = {k: v for k, v in options.items() if k not in dropped}
    if spec.has_keypoints:
        if not data.keypoint_names:
            raise DetfitError(f"{cfg.dataset}: has no keypoints, and {cfg.model} needs them")
        options.setdefault("num_keypoints", len(data.keypoint_names))
    return options


def loss_weights_for(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, float]:
    """The recipe's loss weights that apply to ``cfg.model``: a box model ignores ``loss_mask``
    (and a model without keypoints ``loss_keypoint``), with one line saying so."""
    spec = get_spec(cfg.model)
    absent = {"loss_mask": not spec.has_masks, "loss_keypoint": not spec.has_keypoints}
    dropped = [k for k in cfg.loss_weights if absent.get(k)]
    if dropped:
        log(f"{cfg.model} computes no {', '.join(dropped)}: ignoring its loss weight")
    return {k: v for k, v in cfg.loss_weights.items() if k not in dropped}


def fit(
    cfg: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train ``cfg`` (or continue the run in ``resume``); returns the run folder."""
    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt = load_checkpoint(run_dir / "last.pt" if run_dir.is_dir() else run_dir)
        run_dir = run_dir if run_dir.is_dir() else run_dir.parent
        cfg = TrainConfig.from_dict(ckpt["config"], f"{run_dir}/last.pt")
    assert cfg is not None
    run_dir = run_dir if ckpt else Path(cfg.out) if cfg.out else new_run_dir(cfg.model)

    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = build_datasets(cfg, log=log)
    if ckpt:
        # with EMA, "model" holds the averaged (evaluated) weights and "train_model" the raw ones
        model = rebuild_model(ckpt["model_info"], ckpt.get("train_model") or ckpt["model"])
        info = ckpt["model_info"]
    else:
        options = options_for_data(cfg, data, log)
        model = build_model(
            cfg.model,
            len(data.classes),
            weights=cfg.weights,
            weights_backbone=cfg.weights_backbone,
            **options,
        )
        info = model_info(cfg.model, len(data.classes), data.classes, options, model)
        info["category_ids"] = data.category_ids
    if "segm" in iou_types_for(model) and not data.has_masks:
        raise DetfitError(
            f"{cfg.dataset}: not every object has a mask, so {cfg.model} cannot train on it; "
            "choose a detection model (detfit models)"
        )
    model.to(device)
    ema = ema_model(model, cfg.ema_decay) if cfg.ema_decay else None
    eval_model = ema.module if ema is not None else model
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    train_loader, test_loader = build_loaders(cfg, data, loader_gen)
    optimizer = build_optimizer(cfg, model)
    iters_per_epoch = min(len(train_loader), cfg.max_iters_per_epoch or len(train_loader))
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    metric_key = "segm_AP" if "segm" in iou_types_for(model) else "bbox_AP"
    loss_weights = loss_weights_for(cfg, log)

    start_epoch, history, best, minutes_before = 0, [], -1.0, 0.0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        loader_gen.set_state(ckpt["loader_rng"])
        start_epoch = ckpt["epoch"] + 1
        history = list(ckpt["history"])
        best = ckpt["best"]
        minutes_before = history[-1]["minutes"] if history else 0.0
        if ema is not None:
            ema.module.load_state_dict(ckpt["model"])
            ema.n_averaged.fill_(ckpt["ema_updates"])
        log(f"resuming {run_dir} at epoch {start_epoch}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    log(
        f"run folder {run_dir} | model {cfg.model} | {len(data.train)} train / {len(data.test)} "
        f"test images | {iters_per_epoch} iterations per epoch | device {device}"
    )

    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        train_stats = train_one_epoch(
            model,
            optimizer,
            train_loader,
            device,
            epoch,
            cfg.print_freq,
            scaler,
            lr_scheduler=scheduler,
            clip_grad_norm=cfg.clip_grad_norm,
            max_iters=cfg.max_iters_per_epoch,
            progress=progress,
            ema=ema,
            loss_weights=loss_weights,
        )
        result = evaluate(
            eval_model, test_loader, device, classes=data.classes, progress=progress, verbose=False
        )
        row = {
            "epoch": epoch,
            "minutes": round(minutes_before + (time.perf_counter() - t0) / 60, 3),
            **{f"train_{k}": v for k, v in train_stats.items()},
            "eval_seconds": result.seconds,
            "eval_seconds_per_image": result.seconds / max(result.num_images, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **flatten_metrics(result.stats),
            **flatten_per_class(result.per_class),
        }
        history.append(row)
        write_metrics(run_dir, history)
        checkpoint = {
            "model": eval_model.state_dict(),
            "model_info": info,
            "config": cfg.to_dict(),
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "loader_rng": loader_gen.get_state(),
            "history": history,
            "best": max(best, row[metric_key]),
            "metric_key": metric_key,
        }
        if ema is not None:
            checkpoint.update(train_model=model.state_dict(), ema_updates=int(ema.n_averaged))
        save_checkpoint(run_dir / "last.pt", checkpoint)
        if row[metric_key] > best:
            best = row[metric_key]
            save_checkpoint(run_dir / "best.pt", checkpoint)
        aps = " ".join(
            f"{t} AP {s['AP']:.3f} (AP50 {s['AP50']:.3f})" for t, s in result.stats.items()
        )
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {train_stats.get('loss', float('nan')):.3f} | "
            f"{aps} | {row['minutes']:.1f} min"
        )
    return run_dir
