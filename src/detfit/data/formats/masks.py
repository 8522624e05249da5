"""Instance-mask folders, as Penn-Fudan: images plus PNG masks whose pixel values are instance
ids (0 = background). Classes: one for all, or a per-mask ``<mask stem>.json`` mapping ids to
class names (``{"1": "person", "2": "bicycle"}``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detfit.data.images import list_images, load_mask_ids, read_header
from detfit.data.pennfudan import find_pennfudan_root
from detfit.data.records import AnnotatedSet, ImageRecord, Instance, Problem, class_list
from detfit.errors import DetfitError


def find_layout(root: Path) -> tuple[Path, Path]:
    """``images/`` + ``masks/`` in ``root``, or Penn-Fudan's ``PNGImages/`` + ``PedMasks/`` (in
    ``root`` or its ``PennFudanPed/``, as Penn-Fudan's own finder accepts them)."""
    root = Path(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return root / "images", root / "masks"
    try:
        pennfudan = find_pennfudan_root(root)
    except DetfitError:
        raise DetfitError(
            f"{root}: expected images/ and masks/ folders (or PNGImages/ and PedMasks/)"
        ) from None
    return pennfudan / "PNGImages", pennfudan / "PedMasks"


def mask_for(image: Path, masks_dir: Path) -> Path | None:
    for name in (f"{image.stem}.png", f"{image.stem}_mask.png"):
        if (masks_dir / name).is_file():
            return masks_dir / name
    return None


def read_mask_folder(
    root: Path, names: list[str] | None = None, drop_empty: bool = False
) -> AnnotatedSet:
    images_dir, masks_dir = find_layout(root)
    problems: list[Problem] = []
    maps: dict[Path, dict[int, str]] = {}
    pairs = []
    for image_path in list_images(images_dir):
        mask_path = mask_for(image_path, masks_dir)
        if mask_path is None:
            problems.append(Problem(str(image_path), f"no mask in {masks_dir}", fatal=True))
            continue
        sidecar = mask_path.with_suffix(".json")
        if sidecar.is_file():
            try:
                maps[mask_path] = {
                    int(k): str(v) for k, v in json.loads(sidecar.read_text()).items()
                }
            except (OSError, ValueError, AttributeError, TypeError) as exc:
                problems.append(Problem(str(sidecar), f"not an id -> class map ({exc})", True))
        pairs.append((image_path, mask_path))
    if names is None:
        found = sorted({n for m in maps.values() for n in m.values()})
        names = found or ["object"]
    classes = class_list(names)
    label_of = {n: i for i, n in enumerate(classes) if i}

    images = []
    for index, (image_path, mask_path) in enumerate(pairs):
        try:
            header = read_header(image_path)
            ids_map = load_mask_ids(mask_path).numpy()  # numpy: one thread, fast
        except DetfitError as exc:
            problems.append(Problem(*str(exc).split(": ", 1), fatal=True))
            continue
        if tuple(ids_map.shape) != (header.height, header.width):
            problems.append(
                Problem(
                    str(mask_path),
                    f"mask is {ids_map.shape[1]}x{ids_map.shape[0]} but its image is "
                    f"{header.width}x{header.height}",
                    fatal=True,
                )
            )
            continue
        record = ImageRecord(
            file=str(image_path),
            image_id=index,
            width=header.width,
            height=header.height,
            mask_path=mask_path,
            file_name=image_path.name,
        )
        values = np.unique(ids_map).tolist()  # not bincount: ids may be huge or negative
        if values and values[0] < 0:
            problems.append(Problem(str(mask_path), f"negative instance id {values[0]}", True))
            continue
        class_map = maps.get(mask_path, {})
        for value in values:
            if value == 0:
                continue
            name = class_map.get(value, classes[1] if not class_map else None)
            if name not in label_of:
                problems.append(
                    Problem(str(mask_path), f"instance {value} has no known class ({name})", True)
                )
                continue
            ys, xs = np.nonzero(ids_map == value)
            box = (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)
            record.instances.append(Instance(label=label_of[name], box=box, mask_value=value))
        if record.instances or not drop_empty:
            images.append(record)
    return AnnotatedSet(classes=classes, images=images, source=str(root), problems=problems)
