"""Resolve pretrained weights: torchvision's Weights API (``DEFAULT``, an enum name), a local file,
or none -- offline-safe, with one-line errors that name the file and the cache folder."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

from detfit.checkpoint import weights_in
from detfit.errors import DetfitError
from detfit.paths import torch_checkpoint_dir

# torchvision names its files ``<name>-<first hex digits of sha256>.pth``.
HASH_SUFFIX = re.compile(r"-([a-f0-9]{8,})\.")
NO_WEIGHTS = {None, "", "none", "None", "null"}


def is_local_file(spec: Any) -> bool:
    """A weights spec that names a file rather than an enum member."""
    return isinstance(spec, (str, Path)) and (
        Path(spec).suffix in {".pth", ".pt", ".ckpt"} or os.sep in str(spec) or Path(spec).is_file()
    )


def resolve_weights(spec: Any, enum_cls: type[WeightsEnum] | None) -> WeightsEnum | Path | None:
    """Turn ``DEFAULT`` / ``COCO_V1`` / ``Enum.MEMBER`` / a path / None into an enum member or path."""
    if spec in NO_WEIGHTS:
        return None
    if isinstance(spec, WeightsEnum):
        return spec
    if is_local_file(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DetfitError(f"{path}: weights file not found")
        return path
    if enum_cls is None:
        raise DetfitError(
            f"weights {spec!r}: this model has no torchvision weights; give a file path"
        )
    name = str(spec).split(".")[-1]
    try:
        return enum_cls[name]
    except KeyError:
        choices = ", ".join(["DEFAULT", *(m for m in enum_cls.__members__ if m != "DEFAULT")])
        raise DetfitError(
            f"weights {spec!r}: not one of {enum_cls.__name__} ({choices}), nor default "
            "(lowercase: the registry's pick for this model)"
        ) from None


def weights_filename(weights: WeightsEnum) -> str:
    return os.path.basename(urlparse(weights.url).path)


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision's Weights API looks for (and downloads) this file."""
    return torch_checkpoint_dir() / weights_filename(weights)


def ensure_cached(weights: WeightsEnum) -> Path:
    """Make sure the file is in torchvision's cache: no network call when it already is."""
    path = cached_weights_path(weights)
    if path.is_file():
        return path
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, SSL errors, hash mismatch...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DetfitError(
            f"cannot download {weights_filename(weights)} ({reason}): fetch {weights.url} "
            f"and put it in {path.parent}"
        ) from None
    return path


def check_hash_suffix(path: Path) -> None:
    """When a file carries torchvision's hash suffix, its sha256 must start with it."""
    match = HASH_SUFFIX.search(path.name)
    if not match:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise DetfitError(
            f"{path}: sha256 {digest[:12]}… does not match the name's suffix {match.group(1)} "
            "(corrupt or renamed download)"
        )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local file (``weights_only=True``); accepts a plain state dict or a
    checkpoint dict holding one under ``model``."""
    path = Path(path)
    check_hash_suffix(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DetfitError(f"{path}: cannot load weights ({first})") from None
    obj = weights_in(obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DetfitError(f"{path}: not a state dict of tensors")
    return obj


def load_weights_state(spec: WeightsEnum | Path) -> dict[str, torch.Tensor]:
    """The state dict behind an enum member (through torchvision's cache) or a local file."""
    if isinstance(spec, WeightsEnum):
        return load_state_dict_file(ensure_cached(spec))
    return load_state_dict_file(spec)
