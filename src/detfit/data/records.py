"""Format-neutral annotations: what every reader (COCO, VOC, YOLO, mask folders) produces.

Readers parse annotation files only; no image is decoded until the dataset is indexed, so a
100k-image COCO file costs memory in proportion to its annotations. Labels are contiguous
(1..K, 0 = background); ``category_ids`` maps them back to the ids of the source file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BACKGROUND = "__background__"


@dataclass(slots=True)
class Instance:
    """One annotated object. Geometry is in pixels of the (EXIF-oriented) image."""

    label: int  # 1..K
    box: tuple[float, float, float, float] | None = None  # XYXY; None: derived from the mask
    polygons: list[list[float]] | None = None  # [[x0, y0, x1, y1, ...], ...] (several parts)
    rle: dict[str, Any] | None = None  # COCO RLE, compressed or uncompressed
    mask_value: int | None = None  # instance id in the image's mask PNG
    keypoints: list[float] | None = None  # [x, y, v] * num_keypoints
    crowd: bool = False  # COCO iscrowd / VOC difficult: ignored in evaluation, never trained on
    area: float | None = None  # the source's area (COCO), kept by conversions
    source_id: int | None = None  # annotation id in the source file
    extra: dict[str, Any] | None = None  # fields to carry through a conversion (e.g. difficult)

    @property
    def has_mask(self) -> bool:
        return self.polygons is not None or self.rle is not None or self.mask_value is not None


@dataclass(slots=True)
class ImageRecord:
    file: str  # the image's path (a str: 100k Path objects cost seconds and memory)
    image_id: int  # the source's id (COCO ids may be 0); the position for id-less formats
    width: int | None = None  # as the annotation file says; None: read from the image header
    height: int | None = None
    instances: list[Instance] = field(default_factory=list)
    mask_path: Path | None = None  # instance-id PNG (mask folders)
    file_name: str | None = None  # as written in the source (kept by conversions)

    @property
    def path(self) -> Path:
        return Path(self.file)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong in the annotations. ``fatal`` problems stop training; others are repaired."""

    file: str
    message: str
    fatal: bool = False

    def __str__(self) -> str:
        kind = "error" if self.fatal else "warning"
        return f"{self.file}: {kind}: {self.message}"


@dataclass
class AnnotatedSet:
    """One split of a dataset as read from its files."""

    classes: list[str]  # classes[0] == BACKGROUND
    images: list[ImageRecord]
    source: str  # the file or folder it was read from, for messages
    category_ids: list[int] | None = None  # source category id per label (index 0 unused)
    keypoint_names: list[str] | None = None
    skeleton: list[list[int]] | None = None
    problems: list[Problem] = field(default_factory=list)  # found while reading

    @property
    def num_instances(self) -> int:
        return sum(len(r.instances) for r in self.images)

    @property
    def has_masks(self) -> bool:
        """True when every non-crowd instance has a mask, so a mask model can train on it."""
        found = False
        for record in self.images:
            for inst in record.instances:
                if inst.crowd:
                    continue
                if not inst.has_mask:
                    return False
                found = True
        return found

    @property
    def has_keypoints(self) -> bool:
        return bool(self.keypoint_names)

    def category_id(self, label: int) -> int:
        """The source's category id for a contiguous label (the label itself when none)."""
        return self.category_ids[label] if self.category_ids else label


def class_list(names: list[str]) -> list[str]:
    """``names`` with the background class in front (once)."""
    names = [n for n in names if n != BACKGROUND]
    return [BACKGROUND, *names]
