"""What test-time augmentation (``--tta``: the image and its mirror, fused) gives and costs.

    python benchmarks/tta_cost.py RUN [--data FORMAT:PATH] [--rounds 3] [--device cpu]

Scores the checkpoint without and with TTA, alternating, ``rounds`` times in one process (so a
shared machine slows both alike), and prints AP per IoU type and seconds per image (the
evaluation loop's own time: model calls, fusion and metric bookkeeping, not reading the files).
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
    args = parser.parse_args()
    seconds: dict[bool, list[float]] = {False: [], True: []}
    stats = {}
    for _ in range(args.rounds):
        for tta in (False, True):
            result = evaluate_checkpoint(
                args.checkpoint,
                data=args.data,
                device=args.device,
                progress=False,
                verbose=False,
                log=lambda line: None,
                tta=tta,
            )
            seconds[tta].append(result.seconds / max(result.num_images, 1))
            stats[tta] = result.stats
            images = result.num_images
    print(f"{images} images, {args.rounds} rounds (median s/image)")
    print("| | " + " | ".join(f"{t} AP" for t in stats[False]) + " | s/image |")
    print("|---" * (len(stats[False]) + 2) + "|")
    for tta, name in ((False, "plain"), (True, "tta (flip)")):
        aps = " | ".join(f"{s['AP']:.3f}" for s in stats[tta].values())
        print(f"| {name} | {aps} | {statistics.median(seconds[tta]):.4f} |")
    ratios = [b / a for a, b in zip(seconds[False], seconds[True])]
    print(f"cost ratio tta / plain per round: {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
