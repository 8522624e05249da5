"""The COCO metric's two backends timed on one synthetic validation set.

    python benchmarks/coco_metric_speed.py --images 5000

Ground truth and detections are generated here from a fixed seed, shaped like a COCO validation
set scored after an epoch: 640x480 images, 1 to 12 objects each (7 on average) of 20 classes at
every scale (small, medium and large), 1% crowd regions, masks as compressed RLEs (polygons
with 12-24 vertices, rasterised by pycocotools), and detections as a trained detector gives them:
most objects found with a jittered box and outline, some under the wrong class, duplicates,
false positives, scores spread over [0, 1], up to 100 per image.

Each backend is timed inside ``CocoEvaluator.evaluate``, what training runs after every epoch
and ``detfit eval`` runs (build the ground truth, index it, load the results, evaluate,
accumulate, summarise, per-class AP), for bbox and then segm, in this one process, the backends
taking turns for ``--repeats`` rounds on fresh copies of the data; the fastest round of each is
reported. Then their 12 stats and per-class APs are compared. Generation is not timed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from detfit.eval.coco import STAT_NAMES, CocoEvaluator  # noqa: E402

IOU_TYPES = ("bbox", "segm")
HEIGHT, WIDTH = 480, 640
NUM_CLASSES = 20


def outline(rng: np.random.Generator, box: np.ndarray) -> list[float]:
    """A star-shaped polygon filling most of ``box`` (x0, y0, x1, y1), 12-24 vertices."""
    n = int(rng.integers(12, 25))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.6, 1.0, n)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    xs = np.clip(cx + rx * radius * np.cos(angles), 0, WIDTH)
    ys = np.clip(cy + ry * radius * np.sin(angles), 0, HEIGHT)
    return np.stack([xs, ys], 1).round(2).reshape(-1).tolist()


def rle(polygon: list[float]) -> dict[str, Any]:
    encoded = mask_util.merge(mask_util.frPyObjects([polygon], HEIGHT, WIDTH))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def random_box(rng: np.random.Generator) -> np.ndarray:
    """Sides log-uniform in [6, 400] px: areas from ~40 to ~100,000 px, all three COCO ranges."""
    w, h = np.exp(rng.uniform(np.log(6), np.log(400), 2))
    w, h = min(w, WIDTH - 1), min(h, HEIGHT - 1)
    x0, y0 = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
    return np.array([x0, y0, x0 + w, y0 + h])


def jitter(rng: np.random.Generator, box: np.ndarray, scale: float) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    moved = box + rng.normal(0, scale, 4) * np.array([w, h, w, h])
    moved[[0, 2]] = np.clip(moved[[0, 2]], 0, WIDTH)
    moved[[1, 3]] = np.clip(moved[[1, 3]], 0, HEIGHT)
    moved[2:] = np.maximum(moved[2:], moved[:2] + 2)
    return moved


def xywh(box: np.ndarray) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def make_set(num_images: int, seed: int) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """A COCO instances dict and the detections for bbox and segm (same objects, same scores)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    results: dict[str, list[dict]] = {t: [] for t in IOU_TYPES}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": HEIGHT, "width": WIDTH})
        detections = []  # (box, polygon, category, score)
        for _ in range(int(rng.integers(1, 13))):
            box, category = random_box(rng), int(rng.integers(1, NUM_CLASSES + 1))
            polygon = outline(rng, box)
            segmentation = rle(polygon)
            crowd = rng.random() < 0.01
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": xywh(box),
                    "area": float(mask_util.area(segmentation)),
                    "iscrowd": int(crowd),
                    "segmentation": segmentation,
                }
            )
            if crowd or rng.random() < 0.15:  # a miss
                continue
            found = jitter(rng, box, 0.06)
            label = category if rng.random() < 0.9 else int(rng.integers(1, NUM_CLASSES + 1))
            detections.append((found, outline(rng, found), label, rng.beta(5, 2)))
            if rng.random() < 0.2:  # a duplicate, scored lower
                again = jitter(rng, box, 0.12)
                detections.append((again, outline(rng, again), label, rng.beta(2, 4)))
        for _ in range(int(rng.poisson(4))):  # false positives, mostly low scores
            box = random_box(rng)
            detections.append(
                (box, outline(rng, box), int(rng.integers(1, NUM_CLASSES + 1)), rng.beta(1.5, 5))
            )
        for box, polygon, label, score in detections[:100]:
            common = {"image_id": image_id, "category_id": label, "score": round(float(score), 5)}
            results["bbox"].append({**common, "bbox": xywh(box)})
            results["segm"].append({**common, "segmentation": rle(polygon)})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def run(backend: str, ground_truth: dict, results: dict) -> tuple[dict, dict, dict]:
    """Seconds, the 12 stats and per-class AP per IoU type: ``CocoEvaluator.evaluate`` on data
    as its ``process()`` and ``gather()`` leave it."""
    seconds, stats, per_class = {}, {}, {}
    classes = ["__background__", *(c["name"] for c in ground_truth["categories"])]
    for iou_type in IOU_TYPES:
        evaluator = CocoEvaluator((iou_type,), classes, backend)
        evaluator.images = ground_truth["images"]
        evaluator.annotations = ground_truth["annotations"]
        evaluator.results = {iou_type: results[iou_type]}
        start = time.perf_counter()
        values = evaluator.evaluate()[iou_type]
        seconds[iou_type] = time.perf_counter() - start
        stats[iou_type] = np.array([values[n] for n in STAT_NAMES])
        per_class[iou_type] = np.array(list(evaluator.per_class[iou_type].values()))
    return seconds, stats, per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the fastest is reported")
    args = parser.parse_args()

    start = time.perf_counter()
    ground_truth, results = make_set(args.images, args.seed)
    num_dets = len(results["bbox"])
    print(
        f"synthetic set: {args.images} images {WIDTH}x{HEIGHT}, "
        f"{len(ground_truth['annotations'])} objects, {num_dets} detections per IoU type, "
        f"{NUM_CLASSES} classes (made in {time.perf_counter() - start:.1f} s, not timed)"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    names = ("pycocotools", "faster-coco-eval")
    best: dict[str, dict[str, float]] = {n: {t: float("inf") for t in IOU_TYPES} for n in names}
    outputs: dict[str, tuple[dict, dict]] = {}
    for round_ in range(args.repeats):
        for name in names:
            # loadRes and evaluate() add keys to the dicts they are given: fresh copies each run
            fresh = copy.deepcopy((ground_truth, results))
            seconds, stats, per_class = run(name, *fresh)
            for t in IOU_TYPES:
                best[name][t] = min(best[name][t], seconds[t])
            outputs[name] = (stats, per_class)
            line = ", ".join(f"{t} {seconds[t]:.2f} s" for t in IOU_TYPES)
            print(f"round {round_ + 1}: {name:16s} {line}, total {sum(seconds.values()):.2f} s")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nfastest of {args.repeats} round(s), seconds:")
    print(f"{'':18s}{'bbox':>9s}{'segm':>9s}{'total':>9s}")
    for name in names:
        row = [best[name][t] for t in IOU_TYPES]
        print(f"{name:18s}" + "".join(f"{s:9.2f}" for s in [*row, sum(row)]))
    ratios = [best["pycocotools"][t] / best["faster-coco-eval"][t] for t in IOU_TYPES]
    total = sum(best["pycocotools"].values()) / sum(best["faster-coco-eval"].values())
    print(f"{'ratio':18s}" + "".join(f"{r:8.2f}x" for r in [*ratios, total]))

    (ref_stats, ref_ap), (fast_stats, fast_ap) = outputs["pycocotools"], outputs["faster-coco-eval"]
    print()
    for t in IOU_TYPES:
        stat_diff = np.abs(ref_stats[t] - fast_stats[t])
        ap_diff = np.abs(ref_ap[t] - fast_ap[t]).max()
        worst = STAT_NAMES[int(stat_diff.argmax())]
        print(
            f"{t}: AP {ref_stats[t][0]:.4f}; max abs difference over the 12 stats "
            f"{stat_diff.max():.3g} ({worst}), over the {NUM_CLASSES} per-class APs {ap_diff:.3g}"
        )


if __name__ == "__main__":
    main()
