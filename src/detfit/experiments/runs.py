"""``detfit runs``: the run folders under a folder side by side, from their own files.

One row per folder holding ``config.yaml`` and ``metrics.csv`` (found at any depth, so a study's
trials are listed too): the best metric (``segm_AP`` for mask models, else ``bbox_AP``, as
``best.pt`` is chosen) and its epoch, the epochs done, the minutes, the model, and each setting
whose value differs between the runs listed. ``detfit plot`` draws the same folders' curves.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from detfit.config import flatten_settings
from detfit.errors import DetfitError
from detfit.plots.curves import read_metrics

# Settings that differ between any two runs without saying how they were trained.
NOT_COMPARED = ("out", "mlflow_tags", "data_root", "workers", "print_freq", "device", "threads")
FIXED_COLUMNS = ("run", "best", "metric", "epoch", "epochs", "minutes", "model")


def find_runs(folder: Path) -> list[Path]:
    """Run folders under ``folder`` (itself included), in path order."""
    if not folder.is_dir():
        raise DetfitError(f"{folder}: not a folder")
    found = {p.parent for p in folder.rglob("metrics.csv") if (p.parent / "config.yaml").is_file()}
    return sorted(found)


def describe_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the row's fixed columns, the run's settings flattened)."""
    settings = yaml.safe_load((run / "config.yaml").read_text()) or {}
    rows = read_metrics(run)
    key = "segm_AP" if any(math.isfinite(r.get("segm_AP", math.nan)) for r in rows) else "bbox_AP"
    scored = [r for r in rows if math.isfinite(r.get(key, math.nan))]
    best = max(scored, key=lambda r: r[key]) if scored else None  # the first of equals
    total = settings.get("epochs")
    fixed = {
        "best": round(best[key], 4) if best else None,
        "metric": key,
        "epoch": int(best["epoch"]) if best else None,
        "epochs": f"{len(rows)}/{total}" if total else str(len(rows)),
        "minutes": round(rows[-1].get("minutes", math.nan), 2),
        "model": settings.get("model", ""),
    }
    return fixed, flatten_settings(settings)


def runs_table(folder: str | Path, sort: str = "best") -> list[dict[str, Any]]:
    """One row per run: the fixed columns, then the settings that differ between the runs,
    sorted by ``sort`` (a column: ``best`` highest first, any other lowest first)."""
    folder = Path(folder)
    runs = find_runs(folder)
    if not runs:
        raise DetfitError(f"{folder}: no run folders (config.yaml and metrics.csv) under it")
    described = [(run, *describe_run(run)) for run in runs]
    keys = list(dict.fromkeys(k for *_, flat in described for k in flat))
    differing = [
        k
        for k in keys
        if k not in NOT_COMPARED
        and k != "model"
        and len({repr(flat.get(k)) for *_, flat in described}) > 1
    ]
    rows = []
    for run, fixed, flat in described:
        label = str(run.relative_to(folder)) if run != folder else run.name
        rows.append({"run": label, **fixed, **{k: flat.get(k) for k in differing}})
    columns = list(rows[0])
    if sort not in columns:
        raise DetfitError(f"--sort {sort}: not a column; choose one of {', '.join(columns)}")
    present = [r for r in rows if r[sort] is not None]
    missing = [r for r in rows if r[sort] is None]
    present.sort(key=lambda r: _sort_key(r[sort]), reverse=sort == "best")
    return present + missing


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns (every key of any row), a header line first."""
    if not rows:
        return "(none)"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [["" if r.get(c) is None else _text(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
