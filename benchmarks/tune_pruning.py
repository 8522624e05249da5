"""What pruning buys in ``detfit tune``: the same search run twice on a synthetic set, once with
the median pruner and once without, printing the minutes each took and the best AP each found.

The sampler's seed is the same, and its first trials are random draws (TPE's start-up), so both
studies try the same settings: the difference is only the epochs the pruner saved. The model is
the CPU recipe's Mask R-CNN on its ImageNet MobileNetV2 (in $TORCH_HOME) at 96 px, so it learns
within a few short epochs and the search ends in minutes on a CPU.

    python benchmarks/tune_pruning.py --out runs/tune_pruning
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from detfit.data.synthetic import make_pennfudan

# the CPU recipe's Mask R-CNN on small images (the synthetic ones are about 64 x 80 px)
MODEL_OPTIONS = {"min_size": 96, "max_size": 160}
SPACE = {
    "lr": {"low": 1.0e-5, "high": 3.0e-2, "log": True},
    "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    "warmup_iters": {"low": 0, "high": 20},
}


def write_search(folder: Path, data_root: Path, pruner: str, args: argparse.Namespace) -> Path:
    settings = {
        "model_options": MODEL_OPTIONS,
        "data_root": str(data_root),
        "num_test": args.test_images,
        "epochs": args.epochs,
        "max_iters_per_epoch": args.iters,
        "workers": 0,
        "threads": args.threads,
        "plots": False,
    }
    search = {
        "name": f"pruning-{pruner}",
        "recipe": "cpu",
        "settings": settings,
        "space": SPACE,
        "pruner": pruner,
        "seed": args.seed,
    }
    path = folder / f"search-{pruner}.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tune_pruning"))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iters", type=int, default=4, help="training steps per epoch")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--test-images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from detfit.experiments.tune import open_study, tune

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    data_root = make_pennfudan(args.out / "data", num_images=args.images)
    results = {}
    for pruner in ("none", "median"):
        search = write_search(args.out, data_root, pruner, args)
        start, cpu_start = time.perf_counter(), time.process_time()
        study_dir = tune(search, args.out / pruner, trials=args.trials, log=lambda line: None)
        minutes = (time.perf_counter() - start) / 60
        # the trials run in this process (one job): its CPU time is theirs, and on a shared
        # machine it varies far less than the wall clock does
        cpu_minutes = (time.process_time() - cpu_start) / 60
        from detfit.experiments.search import load_search

        study = open_study(load_search(search), f"sqlite:///{study_dir.resolve()}/study.db", False)
        states = [t.state.name.lower() for t in study.trials]
        epochs = sum(len(t.intermediate_values) for t in study.trials)
        results[pruner] = (minutes, cpu_minutes, study.best_value, epochs)
        print(
            f"pruner {pruner:6s}: {minutes:5.2f} min ({cpu_minutes:5.2f} CPU min), best segm AP "
            f"{study.best_value:.4f} "
            f"(trial {study.best_trial.number}), {states.count('pruned')} of {len(states)} "
            f"trials pruned, {epochs} epochs trained"
        )
    plain, pruned = results["none"], results["median"]
    print(
        f"pruning: {pruned[0] / plain[0]:.2f}x the minutes, {pruned[1] / plain[1]:.2f}x the CPU "
        f"minutes, {pruned[3] / plain[3]:.2f}x the epochs of the search without it"
    )


if __name__ == "__main__":
    main()
