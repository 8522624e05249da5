"""Opening a large COCO file: load time and peak RSS of a synthetic 100,000-image /
500,000-annotation instances JSON (polygons), and what one more pass costs to index it.

    python benchmarks/large_coco.py --images 100000 --annotations 500000

No image exists on disk: detfit reads annotations only, so the figures are the annotation
file's cost. Each reader runs in a fresh process; memory is its RSS growth (held after reading,
and peak during it) over the same process right after its imports. pycocotools.COCO on the
same file is printed for scale.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def write_file(path: Path, num_images: int, num_annotations: int, seed: int = 0) -> None:
    """A COCO file shaped like a real export: 640x480 images, 8-vertex polygons, 80 classes."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(20, 400, (num_annotations, 2)).round(1)
    wh = rng.uniform(10, 200, (num_annotations, 2)).round(1)
    image_ids = rng.integers(0, num_images, num_annotations)
    cats = rng.integers(1, 81, num_annotations)
    with open(path, "w") as f:
        f.write('{"images": [')
        f.write(
            ",".join(
                f'{{"id": {i}, "file_name": "{i:012d}.jpg", "width": 640, "height": 480}}'
                for i in range(num_images)
            )
        )
        f.write('], "categories": [')
        f.write(",".join(f'{{"id": {c}, "name": "class{c}"}}' for c in range(1, 81)))
        f.write('], "annotations": [')
        parts = []
        for k in range(num_annotations):
            x, y = xy[k]
            w, h = wh[k]
            poly = [x, y, x + w / 2, y - 5, x + w, y, x + w + 5, y + h / 2, x + w, y + h]
            poly += [x + w / 2, y + h + 5, x, y + h, x - 5, y + h / 2]
            parts.append(
                json.dumps(
                    {
                        "id": k + 1,
                        "image_id": int(image_ids[k]),
                        "category_id": int(cats[k]),
                        "bbox": [x, y, w, h],
                        "area": round(w * h, 1),
                        "segmentation": [[round(v, 1) for v in poly]],
                        "iscrowd": 0,
                    }
                )
            )
        f.write(",".join(parts))
        f.write("]}")


def measure(reader: str, path: Path) -> None:
    """Child process: baseline RSS after imports, then read the file; print one line."""
    if reader == "detfit":
        from detfit.data import DatasetSpec, DetectionDataset

        def read():
            annotations = DatasetSpec.parse(f"coco:{path}").read()
            dataset = DetectionDataset(annotations)
            sizes = [dataset.get_height_and_width(i) for i in range(len(dataset))]
            return annotations, dataset, sizes

    else:
        from pycocotools.coco import COCO

        def read():
            return COCO(str(path))

    gc.collect()
    base = current_rss_mib()
    start = time.perf_counter()
    result = read()
    seconds = time.perf_counter() - start
    held = current_rss_mib() - base
    peak = peak_rss_mib() - base
    if reader == "detfit":
        annotations, dataset, sizes = result
        what = (
            f"{len(dataset)} images, {annotations.num_instances} annotations, "
            f"{len(sizes)} sizes from the file (no image opened)"
        )
    else:
        what = f"{len(result.imgs)} images, {len(result.anns)} annotations"
    print(
        f"{reader:12s} {seconds:6.1f} s   held RSS +{held:5.0f} MiB   peak RSS +{peak:5.0f} MiB"
        f"   ({what})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--annotations", type=int, default=500_000)
    parser.add_argument("--measure", choices=["detfit", "pycocotools"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instances.json"
        start = time.perf_counter()
        write_file(path, args.images, args.annotations)
        print(
            f"wrote {path.stat().st_size / 2**20:.0f} MiB ({args.images} images, "
            f"{args.annotations} annotations) in {time.perf_counter() - start:.1f} s"
        )
        print("each reader in its own process; RSS relative to that process after its imports")
        for reader in ("detfit", "pycocotools"):
            cmd = [sys.executable, __file__, "--measure", reader, "--file", str(path)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
