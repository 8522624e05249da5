"""``detfit predict``: stream inputs through a Predictor in batches and write overlays, one JSON
per image, annotated videos with JSON lines (with ``track``: a ``track_id`` per detection), and
optionally the whole set as COCO results."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.io import encode_png
from tqdm.auto import tqdm

from detfit.data.rle import encode_masks
from detfit.errors import DetfitError
from detfit.fileio import atomic_write, atomic_write_text, disk_error
from detfit.predict.defaults import DEFAULT_BATCH_SIZE, DEFAULT_SCORE_THRESHOLD
from detfit.predict.inputs import Item, expand
from detfit.predict.overlay import draw_prediction
from detfit.predict.predictor import Prediction, Predictor
from detfit.predict.slicing import SliceTooLarge, Slicing


@dataclass
class Summary:
    images: int = 0
    frames: int = 0
    written: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    tracks: dict[str, dict[str, int]] = field(default_factory=dict)  # video -> class -> tracks


def default_out(root: Path = Path("runs")) -> Path:
    """The first runs/predict-N that does not exist yet."""
    n = 1
    while (root / f"predict-{n}").exists():
        n += 1
    return root / f"predict-{n}"


def overlay(
    image: torch.Tensor, p: Prediction, track_ids: list[int | None] | None = None
) -> torch.Tensor:
    return draw_prediction(
        image,
        p.boxes,
        p.labels.tolist(),
        p.scores.tolist(),
        p.class_names,
        p.masks,
        p.keypoints,
        track_ids,
    )


def record(p: Prediction, track_ids: list[int | None] | None = None) -> list[dict[str, Any]]:
    """JSON-ready detections: class, source category id, score, xyxy box, mask as COCO RLE,
    and with ``track_ids`` the track's id (null: not part of a track yet)."""
    rles = encode_masks(p.masks) if p.masks is not None and len(p) else []
    out = []
    for k in range(len(p)):
        det: dict[str, Any] = {
            "label": int(p.labels[k]),
            "class": p.class_names[k],
            "category_id": p.category_ids[k],
            "score": float(p.scores[k]),
            "box_xyxy": [round(v, 2) for v in p.boxes[k].tolist()],
        }
        if track_ids is not None:
            det["track_id"] = track_ids[k]
        if rles:
            det["mask_rle"] = rles[k]
        if p.keypoints is not None:
            det["keypoints"] = [round(v, 2) for v in p.keypoints[k].reshape(-1).tolist()]
        out.append(det)
    return out


def coco_results(p: Prediction, image_id: int) -> list[dict[str, Any]]:
    """COCO results format (pycocotools loadRes) for the box metric: xywh boxes, unrounded
    scores (and keypoints)."""
    out = []
    for k in range(len(p)):
        x0, y0, x1, y1 = p.boxes[k].tolist()
        det = {
            "image_id": image_id,
            "category_id": p.category_ids[k],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(p.scores[k]),
        }
        if p.keypoints is not None:
            det["keypoints"] = p.keypoints[k].reshape(-1).tolist()
        out.append(det)
    return out


def coco_segm_results(p: Prediction, image_id: int) -> list[dict[str, Any]]:
    """COCO results for the mask metric: RLE masks and no ``bbox``. pycocotools' loadRes takes a
    record's area from its box when it has one, which puts masks in the wrong size ranges (APs,
    APm, APl); without it the area and box come from the mask (Detectron2 drops the box too)."""
    if p.masks is None or not len(p):
        return []
    return [
        {
            "image_id": image_id,
            "category_id": p.category_ids[k],
            "segmentation": rle,
            "score": float(p.scores[k]),
        }
        for k, rle in enumerate(encode_masks(p.masks))
    ]


def segm_json_path(coco_json: Path) -> Path:
    """Where ``--coco-json results.json`` puts the mask results: ``results.segm.json``."""
    return coco_json.with_name(f"{coco_json.stem}.segm{coco_json.suffix or '.json'}")


class ImageIds:
    """COCO image ids: from a COCO file's ``images`` (by file name), else a numeric file stem
    (COCO's own 000000397133.jpg), else 1, 2, ... in input order."""

    def __init__(self, coco_file: Path | None) -> None:
        self.by_name: dict[str, int] = {}
        if coco_file is not None:
            try:
                images = json.loads(Path(coco_file).read_text())["images"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DetfitError(f"{coco_file}: not a COCO file with images ({exc})") from None
            if not isinstance(images, list):
                raise DetfitError(f"{coco_file}: 'images' must be a list of images")
            for n, im in enumerate(images):
                name = im.get("file_name") if isinstance(im, dict) else None
                image_id = im.get("id") if isinstance(im, dict) else None
                if not isinstance(name, str) or not name:
                    raise DetfitError(f"{coco_file}: images[{n}] has no file_name")
                if isinstance(image_id, bool) or not isinstance(image_id, int):
                    raise DetfitError(
                        f"{coco_file}: images[{n}] ({name[:100]}): id {str(image_id)[:40]!r} is "
                        "not an integer"
                    )
                self.by_name[name] = image_id
                self.by_name.setdefault(Path(name).name, image_id)
        self.next = 1

    def __call__(self, item: Item) -> int:
        for key in (item.name + item.path.suffix, item.path.name):
            if key in self.by_name:
                return self.by_name[key]
        if self.by_name:
            raise DetfitError(f"{item.path}: not among the images of the --image-ids file")
        if re.fullmatch(r"\d+", item.path.stem):
            return int(item.path.stem)
        self.next += 1
        return self.next - 1


def _decoded(items: Iterator[Item], summary: Summary, log: Callable[[str], None]):
    """(item, uint8 image) one at a time; an unreadable image is one line and is skipped."""
    from detfit.data.images import load_rgb

    for item in items:
        try:
            yield item, load_rgb(item.path)
        except DetfitError as exc:
            summary.problems.append(str(exc))
            log(f"detfit: skipped: {exc}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(
    items: Sequence[Item],
    inputs: Sequence[str | Path],
    out: Path,
    coco_json: Path | None,
    image_ids: Path | None,
    overwrite: bool,
) -> None:
    """Refuse, before anything runs, a prediction that would write over what the user gave (an
    image, the --image-ids ground truth) or, without ``overwrite``, over earlier outputs."""
    if out.exists() and not out.is_dir():
        raise DetfitError(f"--out {out}: is a file; give a folder for the predictions")
    out_abs = out.resolve()
    for raw in inputs:
        given = Path(raw)
        if given.is_dir() and given.resolve() == out_abs:
            raise DetfitError(
                f"--out {out}: is the input folder {raw}; give another folder for the predictions"
            )
    for item in items:
        if _inside(item.path.resolve(), out_abs):
            raise DetfitError(
                f"--out {out}: holds the input {item.path}, which predictions could replace; "
                "give another folder"
            )
    if coco_json is not None:
        targets = [coco_json.resolve(), segm_json_path(coco_json).resolve()]
        given = [i.path.resolve() for i in items]
        if image_ids is not None:
            given.append(image_ids.resolve())
        if any(t in given for t in targets):
            raise DetfitError(
                f"--coco-json {coco_json}: is one of the inputs (or the --image-ids file); give "
                "a new file for the results"
            )
    if overwrite:
        return
    names = [n for i in items for n in _outputs(i)]
    existing = [out / n for n in names if (out / n).exists()]
    if coco_json is not None:
        existing += [f for f in (coco_json, segm_json_path(coco_json)) if f.exists()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise DetfitError(
            f"--out {out}: {existing[0]}{more} already exist(s) from an earlier prediction; give "
            "--overwrite to replace them, or another --out"
        )


def _outputs(item: Item) -> tuple[str, str]:
    return (
        (f"{item.name}.mp4", f"{item.name}.jsonl")
        if item.video
        else (
            f"{item.name}.png",
            f"{item.name}.json",
        )
    )


def remove_stale_partials(out: Path) -> list[Path]:
    """The ``.NAME.partial.mp4`` files of video predictions that were killed, and the temporary
    files of interrupted atomic writes: nothing reads them, they only fill the disk."""
    from detfit.fileio import remove_stale_temp_files

    if not out.is_dir():
        return []
    stale = [p for p in out.rglob(".*.partial.mp4") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale + remove_stale_temp_files(out)


def predict_inputs(
    model: str | Path | Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    classes: Sequence[str] | None = None,
    device: str = "auto",
    coco_json: str | Path | None = None,
    image_ids: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tta: bool = False,
    precision: str | None = None,
    slicing: Slicing | None = None,
    track: bool = False,
    tta_scales: Sequence[float] | None = None,
) -> Summary:
    """Predict every image and video; see the module docstring for what is written. Nothing the
    user gave is overwritten, nor earlier outputs unless ``overwrite``. ``precision``: fp32, bf16
    or fp16 for a checkpoint (see Predictor); ``slicing``: predict on tiles
    (:mod:`detfit.predict.slicing`); ``track``: follow the objects of each video (videos only)."""
    if batch_size < 1:
        raise DetfitError(f"--batch-size {batch_size}: must be at least 1")
    if not 0 <= score_threshold <= 1:  # NaN too
        raise DetfitError(f"--score-threshold {score_threshold}: must be between 0 and 1")
    if track:
        from detfit.predict.tracking import bytetrack_class

        bytetrack_class()  # before any work: names the extra when it is missing
        stills = [i for i in expand(inputs, []) if not i.video]
        if stills:
            raise DetfitError(
                f"{stills[0].path}: --track follows objects through videos; this is a still image"
            )
    out = Path(out_dir) if out_dir else default_out()
    coco_path = Path(coco_json) if coco_json else None
    summary = Summary()
    items = list(expand(inputs, summary.problems))
    check_outputs(items, inputs, out, coco_path, Path(image_ids) if image_ids else None, overwrite)
    ids = ImageIds(Path(image_ids) if image_ids else None)
    predictor = (
        model
        if isinstance(model, Predictor)
        else Predictor(
            model,
            device,
            score_threshold=score_threshold,
            classes=classes,
            tta=tta,
            precision=precision,
            slicing=slicing,
            tta_scales=tta_scales,
        )
    )
    remove_stale_partials(out)
    for problem in summary.problems:
        log(f"detfit: skipped: {problem}")
    results: list[dict[str, Any]] = []
    segm_results: list[dict[str, Any]] = []
    has_masks = False  # a mask model: its segm results file is written, empty or not
    images = [i for i in items if not i.video]
    bar = tqdm(
        total=len(images),
        desc="predict",
        unit="img",
        disable=not progress or not images,
        dynamic_ncols=True,
    )
    batch: list[tuple[Item, torch.Tensor]] = []

    def flush() -> None:
        nonlocal has_masks
        for (item, image), p in zip(batch, predictor.predict([im for _, im in batch])):
            has_masks = has_masks or p.masks is not None
            _write_image(out, item, image, p, summary)
            if coco_path:
                image_id = ids(item)
                results.extend(coco_results(p, image_id))
                segm_results.extend(coco_segm_results(p, image_id))
        summary.images += len(batch)
        bar.update(len(batch))
        batch.clear()

    for item, image in _decoded(iter(images), summary, log):
        if predictor.slicing is not None:
            predictor.slicing.check(*image.shape[-2:], str(item.path))
        batch.append((item, image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.update(bar.total - bar.n)
    bar.close()
    for item in (i for i in items if i.video):
        try:
            summary.frames += _predict_video(
                predictor, item, out, batch_size, summary, progress, log, track
            )
        except SliceTooLarge:
            raise
        except DetfitError as exc:
            summary.problems.append(str(exc))
            log(f"detfit: skipped: {exc}")
    if coco_path:
        atomic_write_text(coco_path, json.dumps(results))
        summary.written.append(coco_path)
        if has_masks:
            segm = segm_json_path(coco_path)
            atomic_write_text(segm, json.dumps(segm_results))
            summary.written.append(segm)
    return summary


def _write_image(out: Path, item: Item, image: torch.Tensor, p: Prediction, summary: Summary):
    png = encode_png(overlay(image, p)).numpy().tobytes()
    target = out / f"{item.name}.png"
    atomic_write(target, lambda f: f.write(png))
    doc = {"image": str(item.path), "height": p.height, "width": p.width, "detections": record(p)}
    atomic_write_text(out / f"{item.name}.json", json.dumps(doc, indent=2))
    summary.written += [target, out / f"{item.name}.json"]


def _predict_video(
    predictor: Predictor,
    item: Item,
    out: Path,
    batch_size: int,
    summary: Summary,
    progress: bool,
    log: Callable[[str], None] = print,
    track: bool = False,
) -> int:
    """Annotated <name>.mp4 and <name>.jsonl (one line per frame), both renamed into place;
    with ``track`` the detections carry track ids and ``summary.tracks`` counts the tracks."""
    from detfit.predict.tracking import VideoTracker
    from detfit.predict.video import VideoReader, VideoWriter

    reader = VideoReader(item.path)
    tracker = VideoTracker(reader.rate, predictor.score_threshold) if track else None
    video, lines = out / f"{item.name}.mp4", out / f"{item.name}.jsonl"
    partial = video.with_name(f".{video.name}.partial.mp4")
    writer = None
    count = 0
    jsonl: list[str] = []
    bar = tqdm(
        total=reader.frames or None,
        desc=item.path.name,
        unit="frame",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        frames: list[torch.Tensor] = []

        def flush() -> None:
            nonlocal writer, count
            for frame, p in zip(frames, predictor.predict(frames)):
                if writer is None:
                    writer = VideoWriter(partial, reader.rate, p.width, p.height)
                ids = tracker.update(p) if tracker is not None else None
                writer.write(overlay(frame, p, ids))
                jsonl.append(
                    json.dumps(
                        {
                            "frame": count,
                            "time_s": float(count / reader.rate),
                            "detections": record(p, ids),
                        }
                    )
                )
                count += 1
            bar.update(len(frames))
            frames.clear()

        for frame in reader:
            if count == 0 and not frames and predictor.slicing is not None:
                predictor.slicing.check(*frame.shape[-2:], str(item.path))
            frames.append(frame)
            if len(frames) == batch_size:
                flush()
        if frames:
            flush()
        if writer is None:
            raise DetfitError(f"{item.path}: the video has no frames")
        writer.close()
        writer = None
        os.replace(partial, video)
    except OSError as exc:  # PyAV's errors are OSErrors too: a full disk, a read-only --out
        error = disk_error(exc, video)
        if error is None:
            raise
        raise error from None
    finally:
        bar.close()
        if writer is not None:
            with contextlib.suppress(OSError):  # the disk that just filled up may refuse this too
                writer.container.close()
        partial.unlink(missing_ok=True)
    atomic_write_text(lines, "\n".join(jsonl) + "\n")
    summary.written += [video, lines]
    if tracker is not None:
        summary.tracks[str(item.path)] = tracker.counts()
    if reader.frames and count < reader.frames:
        log(
            f"detfit: warning: {item.path}: its header says {reader.frames} frames, only {count} "
            "could be decoded (a file cut short?); the outputs hold those"
        )
    return count
