"""Export with a parity check: the file is written beside its destination, run through the same
loader ``detfit predict`` uses, compared with eager torch on real images, and only then renamed
into place. A failed check leaves no file behind."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from detfit.errors import DetfitError
from detfit.export.formats import FORMATS, SUFFIXES, metadata, output_keys, to_onnx, to_torchscript
from detfit.export.parity import BOX_TOL, HEADER, ImageParity, compare
from detfit.export.transform import for_export
from detfit.fileio import atomic_write, remove_leftovers_of
from detfit.predict.backends import EagerRunner, load_backend

# Measured refusals (README "Predict and export"): the exported graph is wrong at every size.
REFUSED = {
    ("ssdlite", "onnx"): "SSDlite's ONNX graph decodes boxes 17-33 px away from eager torch at "
    "every input size (scores agree); use --format torchscript",
}
MIN_IMAGES = 4


class ParityError(DetfitError):
    """The exported model disagrees with eager torch (the CLI exits 1)."""


def family(name: str) -> str:
    return next(
        (
            f
            for f in ("ssdlite", "ssd", "retinanet", "fcos", "keypointrcnn", "maskrcnn")
            if name.startswith(f)
        ),
        "fasterrcnn",
    )


def test_split_images(config: dict[str, Any], count: int) -> list[tuple[str, torch.Tensor]]:
    """Up to ``count`` images of distinct sizes from the run's test split; none when the data
    is not at hand."""
    from detfit.config import TrainConfig
    from detfit.data.loaders import build_datasets

    try:
        cfg = TrainConfig.from_dict(config, "checkpoint config")
        data = build_datasets(cfg, download=False, log=lambda s: None)
    except (DetfitError, OSError, KeyError, TypeError, ValueError):
        return []
    found: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    for i in range(min(len(data.test), 200)):
        image = data.test[i][0]
        image = image.float() if image.is_floating_point() else image.float() / 255.0
        found.setdefault(tuple(image.shape[-2:]), (f"test[{i}]", image))
        if len(found) >= count:
            break
    return list(found.values())


def file_images(paths: Sequence[str | Path]) -> list[tuple[str, torch.Tensor]]:
    from detfit.data.images import load_rgb

    return [(Path(p).name, load_rgb(Path(p)).float() / 255.0) for p in paths]


def export_model(
    source: str | Path,
    fmt: str,
    out: str | Path | None = None,
    opset: int = 17,
    images: Sequence[str | Path] = (),
    check: bool = True,
    log: Callable[[str], None] = print,
    *,
    quantize: str | None = None,
    calibration_images: Sequence[str | Path] = (),
    max_ap_drop: float = 0.01,
    box_tolerance: float | None = None,
) -> tuple[Path, list[ImageParity]]:
    """Export the checkpoint (or run folder's best.pt) and check it; returns the file and the
    per-image parity figures. Raises ParityError (nothing written) when they disagree.

    ``quantize="int8"`` (ONNX only) writes a statically quantized model instead, calibrated on
    ``calibration_images`` (default: the run's training split), and replaces the parity check by
    an accuracy check (``export.quantize``): AP of int8 and fp32 on the run's test split, both
    logged; AccuracyError (nothing written) when int8 is more than ``max_ap_drop`` below.

    ``box_tolerance``: the parity check's largest box difference, in pixels (None: ``BOX_TOL``
    of :mod:`detfit.export.parity`; Keypoint R-CNN through ONNX Runtime was measured up to
    1.5e-2 px off on random weights)."""
    from detfit.checkpoint import load_model

    if fmt not in FORMATS:
        raise DetfitError(f"--format {fmt}: choose {' or '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise DetfitError(f"--quantize {quantize}: the one quantization is int8")
    box_tolerance = BOX_TOL if box_tolerance is None else box_tolerance
    if not (math.isfinite(box_tolerance) and box_tolerance >= 0):
        raise DetfitError(f"--box-tolerance {box_tolerance}: must be a number of pixels >= 0")
    if not math.isfinite(max_ap_drop):  # NaN would pass every comparison: no check at all
        raise DetfitError(f"--max-ap-drop {max_ap_drop}: must be a number (AP points, e.g. 0.01)")
    if quantize and fmt != "onnx":
        raise DetfitError(f"--quantize int8: ONNX Runtime quantizes ONNX models, not {fmt}")
    loaded = load_model(source, "cpu")
    path, info, model = loaded.path, loaded.info, loaded.model
    config = loaded.config or {}  # a checkpoint without its training config: no data to find
    reason = REFUSED.get((family(info["name"]), fmt))
    if reason:
        raise DetfitError(f"{info['name']}: cannot export to {fmt}: {reason}")
    suffix = (".int8" if quantize else "") + SUFFIXES[fmt]
    out = Path(out) if out else path.with_name(path.name.removesuffix(".pt") + suffix)
    # a checkpoint without its training config has no data to look for
    found = test_split_images(config, MIN_IMAGES) if config and not images else []
    samples = file_images(images) if images else found
    if quantize:
        calibration = _calibration_images(calibration_images, config, path)
    elif check and not samples:
        raise DetfitError(
            f"{path}: the checkpoint's data is not at hand to check parity; give --images "
            f"(4 or more of different sizes) or --no-check"
        )
    example = samples[0][1] if samples else torch.rand(3, 480, 640)
    keys = output_keys(model, example)
    meta = metadata(info, fmt, keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about constants: parity decides
        exportable = for_export(model)  # resizes as eager torch does, in script and trace
        data = (
            to_onnx(exportable, example, meta, opset)
            if fmt == "onnx"
            else to_torchscript(exportable, meta)
        )
    partial = out.with_name(f".{out.name}.partial{out.suffix}")
    # a stopped export of the same file left these: this one replaces them
    remove_leftovers_of(out, (partial.name, f".{out.name}.partial.int8{out.suffix}"))
    atomic_write(partial, lambda f: f.write(data))
    if quantize:
        _write_int8(partial, out, calibration, info, config, check, max_ap_drop, log)
        return out, []
    try:
        report = check_parity(model, partial, samples, log, box_tolerance) if check else []
        if any(not r.ok for r in report):
            bad = sum(not r.ok for r in report)
            raise ParityError(
                f"{out}: {fmt} export of {info['name']} differs from eager torch on {bad} of "
                f"{len(report)} images (figures above); nothing written (--no-check keeps it)"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out, report


def check_parity(
    model: torch.nn.Module,
    exported: Path,
    samples: list[tuple[str, torch.Tensor]],
    log: Callable[[str], None],
    box_tolerance: float = BOX_TOL,
) -> list[ImageParity]:
    eager = EagerRunner(model, torch.device("cpu"))
    backend = load_backend(exported, "cpu", unfinished=True)
    log(HEADER)
    report = []
    for name, image in samples:
        size = tuple(image.shape[-2:])
        result = compare(name, size, eager([image])[0], backend([image])[0], box_tolerance)
        log(result.line())
        report.append(result)
    if len(samples) < MIN_IMAGES:
        log(f"note: only {len(samples)} image size(s) at hand; the check asks for {MIN_IMAGES}")
    return report


def _calibration_images(
    paths: Sequence[str | Path], config: dict[str, Any], checkpoint: Path
) -> list[torch.Tensor]:
    """The images named (files, or folders of images), else the run's training split."""
    from detfit.data.images import IMAGE_SUFFIXES
    from detfit.export.quantize import CALIBRATION_IMAGES, training_images

    if not paths:
        found = training_images(config, CALIBRATION_IMAGES) if config else []
        if not found:
            raise DetfitError(
                f"{checkpoint}: the checkpoint's training data is not at hand to calibrate int8; "
                "give --calibration-images"
            )
        return found
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            files += sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(given)
    if not files:
        raise DetfitError(f"--calibration-images {paths[0]}: no images there")
    return [image for _, image in file_images(files)]


def _write_int8(
    fp32: Path,
    out: Path,
    calibration: list[torch.Tensor],
    info: dict[str, Any],
    config: dict[str, Any],
    check: bool,
    max_ap_drop: float,
    log: Callable[[str], None],
) -> None:
    """Quantize the float32 export ``fp32`` (a partial file, removed here) into ``out`` after the
    accuracy check; a refused or failed one leaves no file."""
    from detfit.export.quantize import check_accuracy, quantize_int8
    from detfit.models import iou_types

    partial = out.with_name(f".{out.name}.partial.int8{out.suffix}")
    try:
        count = quantize_int8(fp32, partial, calibration)
        log(
            f"int8: {count} convolutions and matrix products, calibrated on {len(calibration)} images"
        )
        if check:
            check_accuracy(
                fp32,
                partial,
                config,
                iou_types(info["name"]),
                info.get("classes") or [],
                max_ap_drop,
                log,
                out,
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        fp32.unlink(missing_ok=True)
