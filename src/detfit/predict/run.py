"""``detfit predict``: stream inputs through a Predictor in batches and write overlays, one JSON
per image, annotated videos with JSON lines (with ``track``: a ``track_id`` per detection), and
optionally the whole set as COCO results."""

from __future__ import annotations

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
from detfit.fileio import atomic_write, atomic_write_text
from detfit.predict.inputs import Item, expand
from detfit.predict.overlay import draw_prediction
from detfit.predict.predictor import DEFAULT_SCORE_THRESHOLD, Prediction, Predictor
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
    """COCO results format (pycocotools loadRes): xywh boxes, unrounded scores, RLE masks."""
    rles = encode_masks(p.masks) if p.masks is not None and len(p) else []
    out = []
    for k in range(len(p)):
        x0, y0, x1, y1 = p.boxes[k].tolist()
        det = {
            "image_id": image_id,
            "category_id": p.category_ids[k],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(p.scores[k]),
        }
        if rles:
            det["segmentation"] = rles[k]
        if p.keypoints is not None:
            det["keypoints"] = p.keypoints[k].reshape(-1).tolist()
        out.append(det)
    return out


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
            for im in images:
                self.by_name[im["file_name"]] = int(im["id"])
                self.by_name.setdefault(Path(im["file_name"]).name, int(im["id"]))
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


def predict_inputs(
    model: str | Path | Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    batch_size: int = 4,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    classes: Sequence[str] | None = None,
    device: str = "auto",
    coco_json: str | Path | None = None,
    image_ids: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    slicing: Slicing | None = None,
    track: bool = False,
) -> Summary:
    """Predict every image and video; see the module docstring for what is written.
    ``slicing``: predict on tiles (:mod:`detfit.predict.slicing`); ``track``: follow the objects
    of each video (videos only)."""
    if batch_size < 1:
        raise DetfitError(f"--batch-size {batch_size}: must be at least 1")
    if track:
        from detfit.predict.tracking import bytetrack_class

        bytetrack_class()  # before any work: names the extra when it is missing
        stills = [i for i in expand(inputs, []) if not i.video]
        if stills:
            raise DetfitError(
                f"{stills[0].path}: --track follows objects through videos; this is a still image"
            )
    predictor = (
        model
        if isinstance(model, Predictor)
        else Predictor(
            model, device, score_threshold=score_threshold, classes=classes, slicing=slicing
        )
    )
    out = Path(out_dir) if out_dir else default_out()
    if out.exists() and not out.is_dir():
        raise DetfitError(f"--out {out}: is a file; give a folder for the predictions")
    summary = Summary()
    items = list(expand(inputs, summary.problems))
    for problem in summary.problems:
        log(f"detfit: skipped: {problem}")
    ids = ImageIds(Path(image_ids) if image_ids else None)
    results: list[dict[str, Any]] = []
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
        for (item, image), p in zip(batch, predictor.predict([im for _, im in batch])):
            _write_image(out, item, image, p, summary)
            if coco_json:
                results.extend(coco_results(p, ids(item)))
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
                predictor, item, out, batch_size, summary, progress, track
            )
        except SliceTooLarge:
            raise
        except DetfitError as exc:
            summary.problems.append(str(exc))
            log(f"detfit: skipped: {exc}")
    if coco_json:
        atomic_write_text(Path(coco_json), json.dumps(results))
        summary.written.append(Path(coco_json))
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
    finally:
        bar.close()
        if writer is not None:
            writer.container.close()
        partial.unlink(missing_ok=True)
    atomic_write_text(lines, "\n".join(jsonl) + "\n")
    summary.written += [video, lines]
    if tracker is not None:
        summary.tracks[str(item.path)] = tracker.counts()
    return count


def predict_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    device: str = "auto",
) -> list[Path]:
    """The earlier API: overlays and JSON for ``images``; returns the files written."""
    summary = predict_inputs(
        checkpoint,
        images,
        out_dir,
        score_threshold=score_threshold,
        device=device,
        progress=False,
        log=lambda s: None,
    )
    if summary.problems:
        raise DetfitError(summary.problems[0])
    return summary.written
