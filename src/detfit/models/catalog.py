"""``detfit models``: every architecture and backbone with what torchvision's weights metadata says
(COCO AP, parameters, GFLOPS, file size) and whether its weights file is already in the torch hub
cache, i.e. whether it builds here without a network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchvision.models import WeightsEnum

from detfit.models.backbone_detectors import HEADS
from detfit.models.backbones import BACKBONES, backbone_enum
from detfit.models.registry import MODELS
from detfit.models.weights import cached_weights_path

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows


def _number(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _facts(weights: WeightsEnum) -> list[str]:
    meta = weights.meta
    return [
        _number(meta.get("num_params", 0) / 1e6),
        _number(meta.get("_ops"), 2),
        _number(meta.get("_file_size")),
        "yes" if cached_weights_path(weights).is_file() else "no",
    ]


def tables() -> list[Table]:
    """Situation A models, the backbones of situation B, and the situation B models."""
    a_rows, b_rows = [], []
    for spec in MODELS.values():
        if spec.situation == "A":
            weights = spec.weights_enum.DEFAULT
            metrics = next(iter(weights.meta["_metrics"].values()))
            aps = [_number(metrics.get(k)) for k in ("box_map", "mask_map", "kp_map")]
            a_rows.append([spec.name, spec.task, *aps, *_facts(weights)])
        else:
            cached = cached_weights_path(spec.backbone_enum[spec.default_weights_backbone])
            fpn = "yes" if spec.name.endswith("_fpn") else "no"
            offline = "yes" if cached.is_file() else "no"
            b_rows.append([spec.name, spec.task, spec.backbone, fpn, offline])
    backbone_rows = []
    for name in BACKBONES:
        weights = backbone_enum(name).IMAGENET1K_V1
        acc = next(iter(weights.meta["_metrics"].values()))["acc@1"]
        backbone_rows.append([name, _number(acc), *_facts(weights)])
    facts = ["params M", "GFLOPS", "file MB", "offline"]
    return [
        (
            "Situation A: torchvision detectors, COCO weights (DEFAULT), new class layers",
            ["name", "task", "box AP", "mask AP", "kp AP", *facts],
            a_rows,
        ),
        (
            "Backbones for situation B (ImageNet weights IMAGENET1K_V1)",
            ["backbone", "acc@1", *facts],
            backbone_rows,
        ),
        (
            f"Situation B: <head>_<backbone> (one feature map) or <head>_<backbone>_fpn, "
            f"head in {', '.join(HEADS)}",
            ["name", "task", "backbone", "fpn", "offline"],
            b_rows,
        ),
    ]


# Measured by benchmarks/model_speed.py on the project's 2-core CPU (see BENCHMARKS.md).
CPU_SPEED_FILE = Path(__file__).with_name("cpu_speed.json")


def speed_table(path: Path = CPU_SPEED_FILE) -> Table:
    """The measured CPU cost of each architecture, as recorded by the benchmark."""
    data = json.loads(path.read_text())
    rows = [
        [
            r["model"],
            f"{r['train_s_per_iter']:.2f}",
            f"{r['infer_s_per_image']:.2f}",
            str(r["peak_rss_mib"]),
            f"{r['trainable_params_m']:.1f}",
            r["input"],
        ]
        for r in data["rows"]
    ]
    header = ["name", "train s/it", "infer s/img", "peak RSS MiB", "trainable M", "input"]
    title = f"Measured on {data['machine']} (batch 2): {data['command']}"
    return title, header, rows


def render(table: Table) -> str:
    title, header, rows = table
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [title] + [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)
