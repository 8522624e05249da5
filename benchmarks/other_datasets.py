"""Does the CPU recipe's data-dependent part hold up on data that is not Penn-Fudan? The recipe as
committed (it adapts its resize, anchors and detection caps to the training set) against the same
recipe with ``adapt_to_data: false`` (``FIXED`` below: Penn-Fudan's sizes whatever the data), same
epochs, same seeds, on two generated sets:

- ``multiclass``: the synthetic 3-class set of the tests (``write_all_formats``: houses and
  boxes side by side, every fourth image a negative), polygons as COCO;
- ``small-objects``: large images with small scattered objects (``write_scattered_coco``), where
  the recipe's 416 px short side shrinks each object below the first FPN level's anchors and the
  adaptive resize (and anchors) must help.

Both variants train the same number of epochs, so that their AP does not depend on what else
shares the cores; the minutes each took are printed beside it (the adapted resize costs time).
To compare at equal minutes instead, give the cheaper variant more epochs on its own
(``--variants fixed --epochs 16``); ``--set KEY=VALUE`` changes a setting for every variant
(``--set augment=ssj``).

    python benchmarks/other_datasets.py --out runs/other-datasets --epochs 8 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from detfit.config import merge_settings, recipe_config
from detfit.data.synthetic import write_all_formats, write_scattered_coco
from detfit.engine import fit

# The CPU recipe with the sizes it was tuned for on Penn-Fudan, whatever the data.
FIXED: dict[str, Any] = {"adapt_to_data": False}


def make_sets(root: Path) -> dict[str, tuple[str, int]]:
    """Dataset name -> (dataset spec, images held out for evaluation)."""
    formats = write_all_formats(root / "multiclass", num_images=48, size=(96, 144), seed=3)
    small = write_scattered_coco(
        root / "small-objects", 30, (720, 1080), 6, object_size=(10, 20), seed=3
    )
    return {"multiclass": (f"coco:{formats['coco']}", 16), "small-objects": (f"coco:{small}", 8)}


def train(
    spec: str,
    num_test: int,
    variant: str,
    seed: int,
    epochs: int,
    out: Path,
    threads: int | None,
    settings: list[str],
) -> dict:
    overrides = merge_settings(FIXED if variant == "fixed" else {}, sets=settings)
    cfg = recipe_config(
        "cpu",
        dataset=spec,
        num_test=num_test,
        seed=seed,
        epochs=epochs,
        threads=threads,
        plots=False,
        out=str(out),
        **overrides,
    )
    cfg.time_budget = None  # the epochs alone end the run, however busy the machine
    start = time.perf_counter()
    run = fit(cfg, progress=False, log=lambda line: print(f"  {line}"))
    minutes = (time.perf_counter() - start) / 60
    last = json.loads((run / "metrics.json").read_text())[-1]
    return {"bbox": last["bbox_AP"], "segm": last.get("segm_AP"), "minutes": minutes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/other-datasets"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sets", nargs="+", default=["multiclass", "small-objects"])
    parser.add_argument("--variants", nargs="+", default=["fixed", "recipe"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], help="KEY=VALUE for every variant"
    )
    args = parser.parse_args()
    sets = {k: v for k, v in make_sets(args.out / "data").items() if k in args.sets}
    results: dict[tuple[str, str], list[dict]] = {}
    for name, (spec, num_test) in sets.items():
        for seed in args.seeds:
            for variant in args.variants:
                print(f"{name} | {variant} | seed {seed}")
                out = args.out / name / f"{variant}_s{seed}"
                results.setdefault((name, variant), []).append(
                    train(
                        spec, num_test, variant, seed, args.epochs, out, args.threads, args.settings
                    )
                )
    print(f"\nfinal AP after {args.epochs} epochs, per seed {args.seeds}; minutes: whole fit")
    print("dataset        variant  bbox AP per seed     segm AP per seed     minutes")
    for (name, variant), rows in results.items():
        bbox = " ".join(f"{r['bbox']:.3f}" for r in rows)
        segm = " ".join(f"{r['segm']:.3f}" for r in rows)
        minutes = " ".join(f"{r['minutes']:.1f}" for r in rows)
        print(f"{name:14} {variant:8} {bbox:20} {segm:20} {minutes}")
    for name in sets if {"fixed", "recipe"} <= set(args.variants) else ():
        fixed, recipe = results[(name, "fixed")], results[(name, "recipe")]
        for key in ("bbox", "segm"):
            gain = statistics.mean(r[key] for r in recipe) - statistics.mean(r[key] for r in fixed)
            print(f"{name}: recipe - fixed, {key} AP (mean over seeds): {gain:+.3f}")


if __name__ == "__main__":
    main()
