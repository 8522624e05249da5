"""Readers of annotation formats, each returning an :class:`~detfit.data.records.AnnotatedSet`."""

from __future__ import annotations

from pathlib import Path

from detfit.data.formats.coco import read_coco
from detfit.data.formats.masks import read_mask_folder
from detfit.data.formats.voc import read_voc
from detfit.data.formats.yolo import read_yolo
from detfit.data.records import AnnotatedSet
from detfit.errors import DetfitError

FORMATS = ("coco", "voc", "yolo", "masks", "pennfudan")


def read_split(
    fmt: str,
    path: Path | list[Path],
    images: Path | None = None,
    names: list[str] | None = None,
    drop_empty: bool = False,
) -> AnnotatedSet:
    """Read one split of a dataset in format ``fmt``; ``names`` fixes the classes (not COCO's)."""
    if fmt == "pennfudan":  # the tutorial's set: found in detfit's cache or downloaded
        from detfit.data.pennfudan import resolve_pennfudan

        given = None if str(path) == "." else path
        return read_mask_folder(resolve_pennfudan(given), ["person"], drop_empty)
    if fmt != "yolo" and isinstance(path, list):
        raise DetfitError(f"{fmt}: a split is one path, got a list")
    if fmt != "yolo" and not Path(path).exists():
        raise DetfitError(f"{path}: not found")
    if fmt == "coco":
        return read_coco(path, images, drop_empty=drop_empty)
    if fmt == "voc":
        return read_voc(path, names, drop_empty=drop_empty)
    if fmt == "yolo":
        return read_yolo(path, names, drop_empty=drop_empty)
    if fmt == "masks":
        return read_mask_folder(path, names, drop_empty=drop_empty)
    raise DetfitError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
