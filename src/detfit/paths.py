"""Where detfit keeps things on disk: one place for every default path."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root for downloaded data (``$DETFIT_HOME``, default ``~/.cache/detfit``)."""
    return Path(os.environ.get("DETFIT_HOME", Path.home() / ".cache" / "detfit")).expanduser()


def data_dir() -> Path:
    """Folder datasets are downloaded into."""
    return cache_dir() / "data"


def torch_checkpoint_dir() -> Path:
    """torchvision's weight cache (``$TORCH_HOME/hub/checkpoints``), where Weights API files live."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


DEFAULT_RUNS_DIR = Path("runs")
