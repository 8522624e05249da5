"""The dataset doctor: every problem in a split, with the file it is in, before training starts.

``check`` is what ``detfit data check`` prints and what training runs first: fatal problems
(missing or unreadable images, references to unknown images or classes, masks or annotations
whose size disagrees with their image) stop; repairable ones (boxes outside the image, degenerate
boxes, EXIF orientation, grayscale/RGBA/16-bit images) are repaired when the data is read.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from detfit.data.detection import MIN_BOX_SIZE
from detfit.data.images import DEFAULT_MAX_PIXELS, check_pixels, decode_check, read_header
from detfit.data.records import AnnotatedSet, ImageRecord, Problem
from detfit.errors import DetfitError

MODE_NOTES = {
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "RGBA": "RGBA",
    "P": "palette",
    "PA": "palette with alpha",
    "CMYK": "CMYK",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I": "32-bit integer",
    "F": "floating-point",
    "1": "1-bit",
}


def _rle_size(rle: dict) -> tuple[int, int] | None:
    size = rle.get("size")
    return (int(size[0]), int(size[1])) if size and len(size) == 2 else None


# Images per split from which the full decode runs in threads (PIL releases the GIL).
PARALLEL_FROM = 16


def _far_outside(polygons: list[list[float]], width: int, height: int) -> bool:
    """A point beyond one image size outside the image: not this image's annotation."""
    return any(
        not (-width <= x <= 2 * width and -height <= y <= 2 * height)
        for polygon in polygons
        for x, y in zip(polygon[0::2], polygon[1::2])
    )


def check_record(
    record: ImageRecord,
    read_images: bool = True,
    decode: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Problem]:
    """Problems of one image and its annotations. ``decode``: every pixel is decoded, so a
    truncated or corrupt file is found here rather than in the middle of an epoch."""
    problems: list[Problem] = []
    name = str(record.path)
    width, height = record.width, record.height
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system kept as surrogates: torchvision fails
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
        return [Problem(shown, "file name is not valid UTF-8: rename the file", fatal=True)]
    if read_images:
        try:
            header = read_header(record.path)
            check_pixels(record.path, header.width, header.height, max_pixels)
            if decode:
                decode_check(record.path)
        except DetfitError as exc:
            return [Problem(name, str(exc).split(": ", 1)[-1], fatal=True)]
        if header.mode != "RGB":
            note = MODE_NOTES.get(header.mode, header.mode)
            problems.append(Problem(name, f"{note} image (mode {header.mode}), read as 8-bit RGB"))
        if header.exif_rotated:
            problems.append(
                Problem(
                    name, f"EXIF orientation {header.orientation}: read rotated, as viewers show it"
                )
            )
        if width and height and (width, height) != (header.width, header.height):
            if header.exif_rotated and (width, height) == header.stored_size:
                message = (
                    f"annotated as {width}x{height}, the stored size, but its EXIF orientation "
                    f"{header.orientation} displays it as {header.width}x{header.height}: "
                    "re-export the annotations on the rotated image or strip the EXIF tag"
                )
            else:
                message = (
                    f"annotations say {width}x{height} but the image is "
                    f"{header.width}x{header.height}"
                )
            problems.append(Problem(name, message, fatal=True))
            return problems
        width, height = header.width, header.height
    elif not record.path.is_file():
        return [Problem(name, "image file not found", fatal=True)]

    for k, inst in enumerate(record.instances):
        what = f"object {k + 1}" + (
            f" (annotation {inst.source_id})" if inst.source_id is not None else ""
        )
        if inst.rle is not None and height and _rle_size(inst.rle) not in (None, (height, width)):
            h, w = _rle_size(inst.rle)
            problems.append(
                Problem(name, f"{what}: mask is {w}x{h} but the image is {width}x{height}", True)
            )
        if (
            inst.polygons is not None
            and width
            and height
            and _far_outside(inst.polygons, width, height)
        ):
            problems.append(
                Problem(
                    name, f"{what}: polygon point more than an image size outside the image", True
                )
            )
        if inst.polygons is not None and any(len(p) % 2 for p in inst.polygons):
            problems.append(
                Problem(name, f"{what}: polygon with an odd number of coordinates (last ignored)")
            )
        if inst.polygons is not None and any(len(p) < 6 for p in inst.polygons):
            problems.append(
                Problem(name, f"{what}: polygon with fewer than 3 points (part ignored)")
            )
        if inst.box is None:
            continue
        x1, y1, x2, y2 = inst.box
        if x2 - x1 < MIN_BOX_SIZE or y2 - y1 < MIN_BOX_SIZE:
            problems.append(Problem(name, f"{what}: box of size {x2 - x1:g}x{y2 - y1:g} (dropped)"))
            continue
        if width and height and (x1 < 0 or y1 < 0 or x2 > width or y2 > height):
            inside = min(x2, width) > max(x1, 0) and min(y2, height) > max(y1, 0)
            action = "clipped to the image" if inside else "entirely outside the image (dropped)"
            problems.append(
                Problem(
                    name,
                    f"{what}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] outside the "
                    f"{width}x{height} image ({action})",
                )
            )
    return problems


Progress = Callable[[Iterable, int], Iterable]


def usable(inst) -> bool:
    """An object training learns from: not a crowd region, a box of at least MIN_BOX_SIZE (or a
    mask to take it from), and, for polygons, one part of 3 points or more."""
    if inst.crowd:
        return False
    if inst.polygons is not None and not any(len(p) >= 6 for p in inst.polygons):
        return False
    if inst.box is None:
        return inst.has_mask
    x1, y1, x2, y2 = inst.box
    return x2 - x1 >= MIN_BOX_SIZE and y2 - y1 >= MIN_BOX_SIZE


def no_usable_objects(annotations: AnnotatedSet) -> Problem | None:
    """A training split without one usable object would train on nothing and end naming a
    best.pt that was never written: a fatal problem, not a training."""
    if not annotations.images or any(
        usable(inst) for r in annotations.images for inst in r.instances
    ):
        return None
    objects = sum(len(r.instances) for r in annotations.images)
    why = (
        "every label/annotation is empty"
        if not objects
        else f"all {objects} objects are crowd regions, degenerate boxes or polygons under 3 points"
    )
    return Problem(
        annotations.source,
        f"no usable object to train on in {len(annotations.images)} images ({why})",
        fatal=True,
    )


def check(
    annotations: AnnotatedSet,
    read_images: bool = True,
    progress: Progress | None = None,
    *,
    decode: bool = True,
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    train: bool = False,
) -> list[Problem]:
    """Every problem of a split: those found while reading it, then per image (in order).

    ``progress(iterable, total)`` wraps the per-image results (e.g. a tqdm bar); full decodes
    of more than a few images run in ``workers`` threads (default: one per core, up to 8).
    """
    problems = list(annotations.problems)
    if train and (empty := no_usable_objects(annotations)) is not None:
        problems.append(empty)
    records = annotations.images
    one = partial(check_record, read_images=read_images, decode=decode, max_pixels=max_pixels)
    threads = workers or min(8, os.cpu_count() or 1)
    if read_images and decode and threads > 1 and len(records) >= PARALLEL_FROM:
        with ThreadPoolExecutor(threads) as pool:
            problems.extend(_flatten(_wrap(pool.map(one, records), len(records), progress)))
    else:
        problems.extend(_flatten(_wrap(map(one, records), len(records), progress)))
    return problems


def _wrap(results: Iterable, total: int, progress: Progress | None) -> Iterable:
    return results if progress is None else progress(results, total)


def _flatten(results: Iterable[list[Problem]]) -> Iterator[Problem]:
    for found in results:
        yield from found


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"min {min(values):g}, median {statistics.median(values):g}, max {max(values):g}"


def summary(annotations: AnnotatedSet) -> list[str]:
    """Counts per class, image sizes and instances per image, as printable lines."""
    per_class: Counter = Counter()
    images_with: Counter = Counter()
    crowd = 0
    for record in annotations.images:
        seen = set()
        for inst in record.instances:
            if inst.crowd:
                crowd += 1
                continue
            per_class[inst.label] += 1
            seen.add(inst.label)
        images_with.update(seen)
    count = len(annotations.classes) - 1
    lines = [
        f"{annotations.source}: {len(annotations.images)} images, {annotations.num_instances} "
        f"annotations ({crowd} crowd/difficult), {count} class{'' if count == 1 else 'es'}"
        + (", masks" if annotations.has_masks else "")
        + (f", {len(annotations.keypoint_names)} keypoints" if annotations.keypoint_names else ""),
        "  class                     instances  images",
    ]
    for label, name in enumerate(annotations.classes[1:], 1):
        lines.append(f"  {name[:24]:24s}  {per_class[label]:9d}  {images_with[label]:6d}")
    sized = [r for r in annotations.images if r.width and r.height]
    lines.append(f"  image width:  {_spread([r.width for r in sized])}")
    lines.append(f"  image height: {_spread([r.height for r in sized])}")
    counts = [len(r.instances) for r in annotations.images]
    empty = sum(c == 0 for c in counts)
    lines.append(f"  objects per image: {_spread(counts)}; {empty} images without objects")
    return lines


MAX_WARNING_LINES = 20


def validate(
    sets: list[AnnotatedSet],
    spec_text: str,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> None:
    """Training's check: one line per repaired problem (up to 20), DetfitError on a fatal one."""
    if progress is None:
        progress = _progress_bar
    problems = [
        p
        for n, s in enumerate(sets)  # the first set is the one trained on
        for p in check(s, progress=progress, max_pixels=max_pixels, train=n == 0)
    ]
    fatal = [p for p in problems if p.fatal]
    if fatal:
        more = (
            f" (and {len(fatal) - 1} more: run detfit data check {spec_text})"
            if len(fatal) > 1
            else ""
        )
        raise DetfitError(f"{fatal[0].file}: {fatal[0].message}{more}")
    for problem in problems[:MAX_WARNING_LINES]:
        log(str(problem))
    if len(problems) > MAX_WARNING_LINES:
        log(
            f"... and {len(problems) - MAX_WARNING_LINES} more repaired problems "
            f"(detfit data check {spec_text})"
        )


def _progress_bar(results: Iterable, total: int) -> Iterable:
    """A bar on a terminal only (tqdm's disable=None), gone when done."""
    from tqdm.auto import tqdm

    return tqdm(results, total=total, desc="checking the data", leave=False, disable=None)
