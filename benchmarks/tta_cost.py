"""What test-time augmentation (``--tta``: the image and its mirror, fused) gives and costs.

    python benchmarks/tta_cost.py RUN [--data FORMAT:PATH] [--rounds 3] [--device cpu] \\
        [--scales 1 --scales 0.85,1,1.15]

Scores the checkpoint without TTA and with each TTA variant (``--scales``: the views' sizes as
factors of the model's own resize, every size also mirrored; default the flip alone),
alternating, ``rounds`` times in one process (so a shared machine slows all alike), and prints
AP per IoU type, seconds per image (the evaluation loop's own time: model calls, fusion and
metric bookkeeping, not reading the files) and each variant's cost against plain inference.
"""

from __future__ import annotations

import argparse
import statistics

from detfit.eval.saved import evaluate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=None, help="score this set instead of the run's split")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scales", action="append", help="a TTA variant: comma-separated sizes (repeat)"
    )
    args = parser.parse_args()
    variants: dict[str, tuple[float, ...] | None] = {"plain": None}
    for text in args.scales or ["1"]:
        scales = tuple(float(s) for s in text.split(","))
        variants[f"tta, flip x {','.join(f'{s:g}' for s in scales)}"] = scales
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    stats = {}
    for _ in range(args.rounds):
        for name, scales in variants.items():
            result = evaluate_checkpoint(
                args.checkpoint,
                data=args.data,
                device=args.device,
                progress=False,
                verbose=False,
                log=lambda line: None,
                tta=scales is not None,
                tta_scales=scales,
            )
            seconds[name].append(result.seconds / max(result.num_images, 1))
            stats[name] = result.stats
            images = result.num_images
    print(f"{args.checkpoint}: {images} images, {args.rounds} rounds (median s/image)")
    print("| | " + " | ".join(f"{t} AP" for t in stats["plain"]) + " | s/image | x plain |")
    print("|---" * (len(stats["plain"]) + 3) + "|")
    for name in variants:
        aps = " | ".join(f"{s['AP']:.3f}" for s in stats[name].values())
        ratio = statistics.median(b / a for a, b in zip(seconds["plain"], seconds[name]))
        print(f"| {name} | {aps} | {statistics.median(seconds[name]):.4f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
