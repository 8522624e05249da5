"""COCO instances JSON: polygons (several parts), RLE (compressed or not), bbox-only and keypoint
annotations; category ids of any values, image ids of any values (0 included)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from detfit.data.records import AnnotatedSet, ImageRecord, Instance, Problem, class_list
from detfit.errors import DetfitError


def read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except OSError as exc:
        raise DetfitError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DetfitError(f"{path}: not valid JSON ({first})") from None


Id = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**63)]  # an int64 tensor holds it
# strict: numbers only (no "3" or true); finite: JSON's NaN/Infinity are no coordinate. Both are
# checked in pydantic's core, so a file of millions of polygon points reads quickly.
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Size = Annotated[int, Strict(), Field(ge=1, lt=2**31)]


def rle_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' rleFrString, in Python), or None
    when it is not one; checked here because pycocotools' C decoder trusts them blindly."""
    values: list[int] = []
    position = 0
    data = counts.encode("ascii", "replace")
    while position < len(data):
        x = shift = 0
        more = True
        while more:
            if position >= len(data):
                return None
            c = data[position] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position += 1
            shift += 5
            if not more and c & 0x10:
                x |= -1 << shift
        if len(values) > 2:
            x += values[-2]
        values.append(x)
    return values


class Rle(BaseModel):
    size: tuple[
        Annotated[int, Strict(), Field(ge=0, lt=2**31)],
        Annotated[int, Strict(), Field(ge=0, lt=2**31)],
    ]
    counts: str | list[Annotated[int, Strict(), Field(ge=0)]]

    @model_validator(mode="after")
    def _covers_the_mask(self) -> Rle:
        counts = rle_counts(self.counts) if isinstance(self.counts, str) else self.counts
        if counts is None or any(c < 0 for c in counts):
            raise ValueError("counts are not a valid RLE")
        height, width = self.size
        if sum(counts) != height * width:
            raise ValueError(f"counts cover {sum(counts)} pixels, not {height}x{width}")
        return self


class CocoCategory(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id
    name: str | int | None = None
    keypoints: list[str] | None = None
    skeleton: Any = None  # carried to conversions only: kept when it is a list of index pairs

    @field_validator("skeleton", mode="plain")
    @classmethod
    def _skeleton(cls, value: Any) -> Any:
        pairs = isinstance(value, list) and all(
            isinstance(p, list) and all(type(i) is int for i in p) for p in value
        )
        return value if pairs else None


class CocoImage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id
    file_name: str = ""
    width: Size | None = None
    height: Size | None = None

    @field_validator("file_name")
    @classmethod
    def _no_nul(cls, name: str) -> str:
        if "\0" in name:
            raise ValueError("a file name cannot hold a NUL character")
        return name


class CocoAnnotation(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id | None = None
    image_id: Id
    category_id: Id
    bbox: Annotated[list[Number], Field(min_length=4, max_length=4)] | None = None
    segmentation: list[Annotated[list[Number], Field(min_length=0)]] | list[Number] | Rle | None = (
        None
    )
    keypoints: list[Number] | None = None
    iscrowd: Annotated[int, Field(ge=0, le=1)] | bool = 0
    area: Annotated[Number, Field(ge=0)] | None = None


def _validate_all(model: type[BaseModel], entries: list[Any]) -> list[BaseModel | ValidationError]:
    """Each entry as ``model``, or the error that names its problem. One call into pydantic's
    core for a valid list (a 500,000-annotation file); entry by entry only when one is invalid."""
    try:
        return list(TypeAdapter(list[model]).validate_python(entries))
    except ValidationError:
        results: list[BaseModel | ValidationError] = []
        for entry in entries:
            try:
                results.append(model.model_validate(entry))
            except ValidationError as exc:
                results.append(exc)
        return results


def _invalid(exc: ValidationError) -> str:
    """The first problem of an entry, as ``key=value: what is allowed``. For a union (a
    segmentation: polygons, or an RLE) pydantic lists every branch's complaint; one of detfit's
    own checks (an RLE whose counts do not cover the image) says what is wrong, so it comes
    first, before "must be a valid list"."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "value_error"), errors[0])
    key = ".".join(
        str(p) for p in error["loc"] if not str(p).startswith(("list[", "constrained", "function-"))
    )
    msg = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    value = repr(error["input"])
    value = value if len(value) <= 40 else value[:37] + "..."
    return f"{key or 'entry'}={value}: {msg}"


# Fields read into an Instance; any other field (attributes, ...) is carried in ``extra``.
HANDLED_FIELDS = {
    *("id", "image_id", "category_id", "bbox", "segmentation"),
    *("keypoints", "num_keypoints", "iscrowd", "area"),
}


def _geometry(ann: CocoAnnotation) -> tuple[list[list[float]] | None, dict | None]:
    seg = ann.segmentation
    if isinstance(seg, list) and seg:
        return (seg if isinstance(seg[0], list) else [seg]), None  # flat list: one polygon
    if isinstance(seg, Rle):
        return None, {"size": list(seg.size), "counts": seg.counts}
    return None, None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of small lists (polygons) would trigger the cyclic GC over and over, for nothing:
    these objects have no cycles. Pausing it makes reading a large file 3-4x faster."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_coco(path: Path, images_dir: Path | None = None, drop_empty: bool = False) -> AnnotatedSet:
    with _gc_paused():
        return _read_coco(path, images_dir, drop_empty)


def _read_coco(path: Path, images_dir: Path | None, drop_empty: bool) -> AnnotatedSet:
    """Read a COCO instances file; image paths are ``images_dir / file_name``.

    Each entry is validated (pydantic): a broken image or annotation entry is a fatal problem
    naming it, so ``data check`` lists them all; a file without its lists is a DetfitError.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DetfitError(f"{path}: not a COCO instances file (no 'images' list)")
    problems: list[Problem] = []
    src = str(path)

    raw_categories = data.get("categories") or []
    if not isinstance(raw_categories, list) or not raw_categories:
        raise DetfitError(f"{path}: no 'categories' list")
    try:
        categories = [CocoCategory.model_validate(c) for c in raw_categories]
    except ValidationError as exc:
        raise DetfitError(f"{path}: a category is not valid ({_invalid(exc)})") from None
    categories.sort(key=lambda c: c.id)
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids):
        raise DetfitError(f"{path}: category ids repeat ({ids})")
    label_of = {c.id: i + 1 for i, c in enumerate(categories)}
    keypoint_cat = next((c for c in categories if c.keypoints), None)
    num_keypoints = len(keypoint_cat.keypoints) if keypoint_cat else 0

    image_entries: list[CocoImage] = []
    for k, result in enumerate(_validate_all(CocoImage, data["images"])):
        if isinstance(result, ValidationError):
            problems.append(Problem(f"{src} (image entry {k})", _invalid(result), fatal=True))
        else:
            image_entries.append(result)
    images_dir = Path(images_dir) if images_dir else _default_images_dir(path, image_entries)
    records: dict[int, ImageRecord] = {}
    base = str(images_dir)
    for img in image_entries:
        if img.id in records:
            problems.append(Problem(src, f"image id {img.id} appears twice", fatal=True))
            continue
        records[img.id] = ImageRecord(
            file=os.path.join(base, img.file_name),
            image_id=img.id,
            width=img.width,
            height=img.height,
            file_name=img.file_name,
        )

    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise DetfitError(f"{path}: 'annotations' is not a list")
    for k, (entry, ann) in enumerate(zip(annotations, _validate_all(CocoAnnotation, annotations))):
        where = f"{src} (annotation {entry.get('id') if isinstance(entry, dict) else k})"
        if isinstance(ann, ValidationError):
            problems.append(Problem(where, _invalid(ann), fatal=True))
            continue
        record = records.get(ann.image_id)
        if record is None:
            problems.append(Problem(where, f"refers to unknown image id {ann.image_id}", True))
            continue
        label = label_of.get(ann.category_id)
        if label is None:
            problems.append(
                Problem(where, f"refers to unknown category id {ann.category_id}", True)
            )
            continue
        if ann.keypoints is not None and len(ann.keypoints) not in (0, 3 * num_keypoints):
            problems.append(
                Problem(
                    where, f"{len(ann.keypoints)} keypoint values, not 3 x {num_keypoints}", True
                )
            )
            continue
        polygons, rle = _geometry(ann)
        box = None
        if ann.bbox is not None:
            x, y, w, h = ann.bbox
            box = (x, y, x + w, y + h)
        record.instances.append(
            Instance(
                label=label,
                box=box,
                polygons=polygons,
                rle=rle,
                keypoints=list(ann.keypoints) if ann.keypoints else None,
                crowd=bool(ann.iscrowd),
                source_id=ann.id,
                area=ann.area,
                extra={k: v for k, v in entry.items() if k not in HANDLED_FIELDS} or None,
            )
        )

    images = [r for r in records.values() if r.instances or not drop_empty]
    return AnnotatedSet(
        classes=class_list([str(c.id if c.name is None else c.name) for c in categories]),
        images=images,
        source=src,
        category_ids=[0, *ids],
        keypoint_names=list(keypoint_cat.keypoints) if keypoint_cat else None,
        skeleton=keypoint_cat.skeleton if keypoint_cat else None,
        problems=problems,
    )


def _default_images_dir(path: Path, images: list[CocoImage]) -> Path:
    """The folder the file names are relative to: next to the JSON, or its ``images/`` sibling."""
    first = next((img.file_name for img in images if img.file_name), None)
    for candidate in (path.parent, path.parent / "images", path.parent.parent / "images"):
        if first is None or (candidate / first).exists():
            return candidate
    return path.parent
