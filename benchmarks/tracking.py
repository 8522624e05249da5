"""Tracking on a video whose objects move on known paths: for each object, the share of its frames
in which it keeps its track id, and the id switches, with ``detfit predict VIDEO --track``.

    python benchmarks/tracking.py --work /tmp/sliced --threads 2

The video (``--frames`` frames of 320 x 320 px at 10 fps, the size the model was trained at)
shows ``--objects`` objects of the synthetic generator's classes (24-40 px) moving in straight
lines and bouncing off the edges; pairs start on the same row moving towards each other, so they
cross (the later one drawn in front). The model is the one ``sliced_inference.py`` trains on the
same kind of objects (in ``WORK/run``; trained here when missing).

Each frame's ground-truth boxes are matched one to one (Hungarian, IoU >= 0.5) to the tracker's
output: the detections that carry a track id.
For an object: *kept* is the share of the frames it is in where it is matched to a detection
carrying its main track id (the one it has most often); a *switch* is a change of track id
between two of its matched, tracked frames. The same is measured with the ground-truth boxes fed
straight to the tracker ("perfect detector"), which tells the tracker's errors from the model's.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

HEIGHT, WIDTH, RATE = 320, 320, 10  # the size the model was trained at


def paths(objects: int, frames: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """Labels and boxes [frames, objects, 4] (xyxy) of objects bouncing in the frame."""
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(1, 4, objects)]
    sizes = rng.integers(24, 41, (objects, 2)).astype(float)
    pos = np.zeros((objects, 2))
    vel = np.zeros((objects, 2))
    for k in range(objects):
        row = 20 + (k // 2) * (HEIGHT - 60) / max(1, (objects + 1) // 2 - 1)
        left = k % 2 == 0  # pairs on one row, heading for each other
        pos[k] = (10 if left else WIDTH - 10 - sizes[k, 0], min(row, HEIGHT - 50))
        vel[k] = (rng.uniform(5, 9) * (1 if left else -1), rng.uniform(-1.5, 1.5))
    boxes = np.zeros((frames, objects, 4))
    for f in range(frames):
        boxes[f, :, :2], boxes[f, :, 2:] = pos, pos + sizes
        pos += vel
        for axis, limit in ((0, WIDTH), (1, HEIGHT)):
            low, high = pos[:, axis] < 1, pos[:, axis] + sizes[:, axis] > limit - 1
            vel[low | high, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], 1, limit - 1 - sizes[:, axis])
    return labels, boxes.round()


def write_video(path: Path, labels: list[int], boxes: np.ndarray, seed: int = 3) -> None:
    import av

    from detfit.data.synthetic import render, shape_polygon

    rng = np.random.default_rng(seed)
    houses = np.random.default_rng(seed + 1).random(len(labels)) < 0.5  # shapes kept throughout
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = 8_000_000
        for frame_boxes in boxes:
            objects = [
                {"label": label, "polygon": shape_polygon(*box, bool(house))}
                for label, box, house in zip(labels, frame_boxes, houses)
            ]
            pixels = render(HEIGHT, WIDTH, objects, rng)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def match(truth: np.ndarray, found: np.ndarray) -> dict[int, int]:
    """Ground-truth index -> detection index, one to one, IoU >= 0.5 (Hungarian)."""
    import torch
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    if not len(truth) or not len(found):
        return {}
    iou = box_iou(
        torch.tensor(truth, dtype=torch.float32), torch.tensor(found, dtype=torch.float32)
    )
    rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols) if iou[r, c] >= 0.5}


def id_figures(boxes: np.ndarray, frames: list[tuple[np.ndarray, list]]) -> dict[str, object]:
    """Per object the share of frames with its main id, and the id switches, from each frame's
    (detected boxes, their track ids)."""
    objects = boxes.shape[1]
    ids: list[list] = [[] for _ in range(objects)]
    for truth, (found, tracks) in zip(boxes, frames):
        tracked = [k for k, t in enumerate(tracks) if t is not None]  # the tracker's output
        matched = {g: tracked[d] for g, d in match(truth, found[tracked]).items()}
        for k in range(objects):
            ids[k].append(tracks[matched[k]] if k in matched else None)
    kept, switches = [], []
    for seq in ids:
        tracked = [t for t in seq if t is not None]
        main = Counter(tracked).most_common(1)[0][0] if tracked else None
        kept.append(sum(t == main for t in seq) / len(seq) if main is not None else 0.0)
        switches.append(sum(a != b for a, b in zip(tracked, tracked[1:])))
    return {"kept": kept, "switches": switches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder for the video and run.")
    parser.add_argument("--checkpoint", type=Path, help="Default: WORK/run/best.pt.")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--objects", type=int, default=6)
    parser.add_argument(
        "--score-threshold", type=float, default=0.3, help="predict's --score-threshold."
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import json

    import torch

    from detfit.predict import Prediction, predict_inputs
    from detfit.predict.tracking import VideoTracker

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from sliced_inference import TRAIN_SIZE, train_model

        from detfit.data.synthetic import write_scattered_coco

        train = args.work / "train" / "annotations.json"
        if not train.is_file():
            write_scattered_coco(train.parent, 64, (TRAIN_SIZE, TRAIN_SIZE), 6, seed=1)
        checkpoint = train_model(args.work, train, 200, args.threads)
    labels, boxes = paths(args.objects, args.frames)
    video = args.work / "paths.mp4"
    write_video(video, labels, boxes)
    out = args.work / "tracked"
    summary = predict_inputs(
        checkpoint,
        [video],
        out,
        device="cpu",
        track=True,
        score_threshold=args.score_threshold,
        progress=False,
        log=print,
    )
    lines = [json.loads(line) for line in (out / "paths.jsonl").read_text().splitlines()]
    detected = [
        (
            np.array([d["box_xyxy"] for d in line["detections"]]).reshape(-1, 4),
            [d["track_id"] for d in line["detections"]],
        )
        for line in lines
    ]
    tracker = VideoTracker(RATE, 0.5)
    perfect = []
    for frame_boxes in boxes:
        p = Prediction(
            boxes=torch.tensor(frame_boxes, dtype=torch.float32),
            labels=torch.tensor(labels),
            scores=torch.full((len(labels),), 0.9),
            class_names=[str(v) for v in labels],
            category_ids=labels,
        )
        perfect.append((frame_boxes, tracker.update(p)))
    found = sum(len(m) for m in (match(t, f) for t, (f, _) in zip(boxes, detected)))
    print(
        f"{args.frames} frames, {args.objects} objects; the model found {found} of "
        f"{boxes.shape[0] * boxes.shape[1]} object-frames (IoU >= 0.5); "
        f"tracks per class: {summary.tracks.get(str(video))}"
    )
    print("| detections | kept its id (mean, min over objects) | id switches (total) |")
    print("|---|---|---|")
    for name, frames in (("model", detected), ("perfect detector", perfect)):
        figures = id_figures(boxes, frames)
        kept = figures["kept"]
        print(f"| {name} | {np.mean(kept):.1%}, {min(kept):.1%} | {sum(figures['switches'])} |")


if __name__ == "__main__":
    main()
