"""The CPU recipe end to end on real Penn-Fudan: AP against wall minutes, s/iteration, eval
s/image and peak RSS, and whether it reaches the target (bbox AP >= 0.60, segm AP >= 0.55 within
30 minutes, evaluation included). Run on a quiet machine:

    python benchmarks/cpu_recipe.py --data-root ../shared/data/PennFudanPed --out runs/bench-cpu
    python benchmarks/cpu_recipe.py --from-run runs/bench-cpu      # print an existing run
    python benchmarks/cpu_recipe.py --data-root ... --seed 1        # another training seed
    python benchmarks/cpu_recipe.py --data-root ... --plain         # the speed-ups off
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from detfit.config import SPEED_UPS_OFF, recipe_config
from detfit.engine import fit

TARGET = {"bbox_AP": 0.60, "segm_AP": 0.55}
BUDGET_MIN = 30.0


def report(run: Path, wall_min: float | None = None) -> None:
    rows = json.loads((run / "metrics.json").read_text())
    print(f"run folder: {run}")
    print("epoch  minutes  bbox AP  AP50   segm AP  AP50   loss   s/iter  eval s/img  peak RSS MiB")
    for r in rows:
        print(
            f"{r['epoch']:5d}  {r['minutes']:7.1f}  {r['bbox_AP']:.3f}   {r['bbox_AP50']:.3f}  "
            f"{r['segm_AP']:.3f}    {r['segm_AP50']:.3f}  {r['train_loss']:.3f}  "
            f"{r['train_seconds_per_iter']:6.2f}  {r['eval_seconds_per_image']:10.3f}  "
            f"{r['peak_rss_mb']:12.0f}"
        )
    hit = next((r for r in rows if all(r[k] >= v for k, v in TARGET.items())), None)
    if hit:
        print(
            f"target reached after epoch {hit['epoch']} at {hit['minutes']:.1f} min "
            f"(bbox {hit['bbox_AP']:.3f}, segm {hit['segm_AP']:.3f})"
        )
    else:
        print("target not reached")
    last = rows[-1]
    print(
        f"final: bbox AP {last['bbox_AP']:.3f}, segm AP {last['segm_AP']:.3f} at "
        f"{last['minutes']:.1f} min of training+evaluation"
    )
    if wall_min is not None:
        print(
            f"wall time of the whole run (data, model build, train, eval, checkpoints): "
            f"{wall_min:.1f} min; budget {BUDGET_MIN:.0f} min"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--out", default="runs/bench-cpu")
    parser.add_argument("--from-run", type=Path)
    parser.add_argument("--seed", type=int, help="training seed (the split stays the default)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="switch the speed-ups off (SPEED_UPS_OFF): the recipe as it ran before them",
    )
    args = parser.parse_args()
    if args.from_run:
        report(args.from_run)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    plain = SPEED_UPS_OFF if args.plain else {}
    cfg = recipe_config("cpu", data_root=args.data_root, out=args.out, seed=args.seed, **plain)
    run = fit(cfg, progress=False)
    report(run, (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
