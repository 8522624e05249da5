"""Checkpoints and run files, written atomically (temporary file + rename), read weights-only."""

from __future__ import annotations

import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detfit.errors import DetfitError
from detfit.fileio import atomic_write

# What a run folder holds; ``--overwrite`` removes these before starting over.
RUN_FILES = ("config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt")


# What eval, predict and export read from a checkpoint: the evaluated weights (EMA's when on), the
# model's description and the settings (``detfit export --strip`` keeps these alone).
INFERENCE_KEYS = ("model", "model_info", "config", "history", "metric_key")
# best.pt also keeps the raw training weights (beside EMA's) and where it was taken, but not the
# optimizer, schedule, RNG or sampler state, which only last.pt needs to continue a run: about
# a third of last.pt's size with AdamW, whose two moments per weight dominate it.
BEST_KEYS = (*INFERENCE_KEYS, "train_model", "epoch", "global_step")


def holds_run(folder: Path) -> bool:
    """True when ``folder`` has any of a run's files (so starting a run there would replace it)."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` so that ``path`` is always either the old or the new complete file."""
    atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path means to eval, predict and export: a run folder means its best.pt
    (last.pt before any epoch was best); a file is itself. ``--resume`` alone reads last.pt."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise DetfitError(f"{path}: no best.pt or last.pt in this folder")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A detfit checkpoint, loaded with ``weights_only=True`` (no code runs from the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise DetfitError(f"{path}: checkpoint not found")
    if path.suffix.lower() == ".onnx" or is_torchscript(path):
        raise DetfitError(
            f"{path}: an exported model (ONNX/TorchScript); this command takes a detfit .pt "
            "checkpoint or run folder (detfit predict takes exports)"
        )
    try:
        with (
            warnings.catch_warnings()
        ):  # a plain pickle's "legacy format" warning: the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only load failed" in first.lower() or "weights_only" in str(exc):
            # torch's text goes on to suggest weights_only=False, which would run the file's code
            first = "it holds Python objects besides tensors and plain data; detfit never runs them"
        raise DetfitError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_info" not in ckpt:
        raise DetfitError(f"{path}: not a detfit checkpoint (no model/model_info)")
    return ckpt


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a code/ folder; torch.save checkpoints do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 2)[1:2] == ["code"] for n in archive.namelist())


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
