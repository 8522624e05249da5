"""Small objects in large images: COCO AP and seconds per image of one model scored on whole
images and on slices (``detfit eval --slice``), on synthetic data made for it.

    python benchmarks/sliced_inference.py --work /tmp/sliced --threads 2

1. Training set: ``--train-images`` 320 x 320 images (8 held out), each with up to 6 objects of 16-40 px
   (the synthetic generator's three classes on noise), and test set: ``--test-images`` images of
   ``--width`` x ``--height`` pixels (3000 x 1500) with up to ``--objects`` objects of the same
   sizes.
2. A Mask R-CNN (MobileNetV2-FPN, ImageNet backbone, the CPU recipe's settings at 320 px) is
   trained for ``--iters`` iterations on the small images (kept in ``WORK/run`` and reused).
3. The same checkpoint is scored on the large images as ``detfit eval`` does, without slicing
   (each image resized to 320 px wide: the objects shrink to 2-4 px) and with ``--slice`` px
   tiles (``--overlap``, plus the whole image unless ``--no-full``), by the same COCO metric.
   Seconds per image are the evaluation loop's (model, merging, mask pasting and RLE encoding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TRAIN_SIZE = 320
# The CPU recipe's Mask R-CNN at 320 px with thin heads: a tile costs about a fifth of the
# recipe model's, so the benchmark runs in minutes on 2 cores.
MODEL_OPTIONS = {
    "min_size": TRAIN_SIZE,
    "max_size": TRAIN_SIZE,
    "fpn_channels": 64,
    "mask_head_channels": 64,
    "mask_head_norm": False,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "box_detections_per_img": 50,
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 150,
}


def make_data(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    from detfit.data.synthetic import write_scattered_coco

    train = work / "train" / "annotations.json"
    test = work / f"test-{args.width}x{args.height}" / "annotations.json"
    if not train.is_file():
        write_scattered_coco(train.parent, args.train_images, (TRAIN_SIZE, TRAIN_SIZE), 6, seed=1)
    if not test.is_file():
        size = (args.height, args.width)
        write_scattered_coco(test.parent, args.test_images, size, args.objects, seed=2)
    return train, test


def train_model(work: Path, train: Path, iters: int, threads: int) -> Path:
    """best.pt of a Mask R-CNN trained ``iters`` iterations on the small images (reused)."""
    from detfit.config import recipe_config
    from detfit.engine import fit

    run = work / "run"
    if (run / "best.pt").is_file():
        return run / "best.pt"
    per_epoch = 20
    cfg = recipe_config(
        "cpu",
        dataset=f"coco:{train}",
        model_options=MODEL_OPTIONS,
        epochs=max(1, iters // per_epoch),
        max_iters_per_epoch=per_epoch,
        warmup_iters=min(50, iters // 4),
        batch_size=4,
        workers=0,
        num_test=8,
        out=str(run),
        threads=threads,
        plots=False,
    )
    start = time.perf_counter()
    fit(cfg, progress=False, log=lambda line: None)
    print(f"trained {iters} iterations in {time.perf_counter() - start:.0f} s")
    return run / "best.pt"


def score(checkpoint: Path, test: Path, slicing) -> dict[str, float]:
    from detfit.eval.saved import evaluate_checkpoint

    result = evaluate_checkpoint(
        checkpoint, data=f"coco:{test}", device="cpu", progress=False, verbose=False,
        slicing=slicing, log=lambda line: None,
    )  # fmt: skip
    return {
        "bbox_AP": result.stats["bbox"]["AP"],
        "bbox_AP50": result.stats["bbox"]["AP50"],
        "segm_AP": result.stats["segm"]["AP"],
        "seconds_per_image": result.seconds / result.num_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder for data and the run.")
    parser.add_argument("--train-images", type=int, default=88, help="8 of them validate.")
    parser.add_argument("--test-images", type=int, default=2)
    parser.add_argument("--width", type=int, default=3000, help="Test image width (px).")
    parser.add_argument("--height", type=int, default=1500, help="Test image height (px).")
    parser.add_argument("--objects", type=int, default=40, help="Objects per test image.")
    parser.add_argument("--iters", type=int, default=80, help="Training iterations.")
    parser.add_argument("--slice", type=int, default=320, help="Tile side (px).")
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()

    import torch

    from detfit.predict.slicing import Slicing

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train, test = make_data(args.work, args)
    checkpoint = train_model(args.work, train, args.iters, args.threads)
    rows = {"whole image": score(checkpoint, test, None)}
    name = f"--slice {args.slice} --overlap {args.overlap}" + ("" if args.full else " --no-full")
    rows[name] = score(checkpoint, test, Slicing(args.slice, args.overlap, args.full))
    objects = len(json.loads(test.read_text())["annotations"])
    size = f"{args.width}x{args.height}"
    print(f"{args.test_images} images of {size} px, {objects} objects of 16-40 px")
    print("| inference | bbox AP | bbox AP50 | segm AP | s/image |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['bbox_AP']:.3f} | {row['bbox_AP50']:.3f} | {row['segm_AP']:.3f} "
            f"| {row['seconds_per_image']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
