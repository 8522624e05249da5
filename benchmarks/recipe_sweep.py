"""Screen variants of a recipe side by side: AP after every epoch for each, in one table.

Each variant is a set of overrides on a named recipe (``model_options`` are merged into the
recipe's, the rest replace). Variants run as parallel processes on one device, which is how they
can be screened on a borrowed GPU in minutes; AP per epoch does not depend on the hardware, so a
winner is then timed with ``benchmarks/cpu_recipe.py`` on the CPU it is meant for.

    python benchmarks/recipe_sweep.py benchmarks/sweeps/cpu_recipe.yaml \\
        --data-root ../shared/data/PennFudanPed --out runs/sweep --deadline-min 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from detfit.config import TrainConfig, merge_settings, recipe_config
from detfit.fileio import atomic_write_text


def variant_config(recipe: str, overrides: dict[str, Any], **extra: Any) -> TrainConfig:
    """The recipe with a variant's overrides merged as the CLI merges them (merge_settings).

    A variant's ``null`` means null here (``weights_backbone: null`` trains from scratch), not
    "not given" as for the CLI's options. A screen compares AP per epoch, which does not depend
    on the hardware, so the recipe's time budget is off unless a variant sets one: the CPU
    recipe's ``30m`` would otherwise plan a GPU's many epochs (or cut variants that share it)
    instead of the recipe's own epochs."""
    settings = merge_settings(recipe_config(recipe, uncap=False).to_dict(), {**overrides, **extra})
    settings.update({key: None for key, value in overrides.items() if value is None})
    if overrides.get("time_budget") is None:
        settings["time_budget"] = None
    return TrainConfig.from_dict(settings, f"variant of {recipe}")


def run_one(args: argparse.Namespace) -> None:
    from detfit.engine import fit

    spec = yaml.safe_load(Path(args.variants).read_text())
    overrides = spec["variants"][args.one] or {}
    cfg = variant_config(
        spec.get("recipe", "cpu"),
        overrides,
        data_root=args.data_root,
        out=str(Path(args.out) / args.one),
        threads=args.threads,
    )
    fit(cfg, progress=False)


def collect(out: Path, names: list[str]) -> dict[str, list[dict[str, float]]]:
    keep = ("epoch", "minutes", "train_loss", "train_seconds_per_iter")
    table = {}
    for name in names:
        path = out / name / "metrics.json"
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            rows = []
        table[name] = [
            {k: v for k, v in r.items() if k in keep or k.split("_")[0] in ("bbox", "segm")}
            for r in rows
        ]
    return table


def print_table(table: dict[str, list[dict[str, float]]]) -> None:
    epochs = max((len(rows) for rows in table.values()), default=0)
    width = max((len(n) for n in table), default=8)
    print(f"{'variant':{width}}  " + "  ".join(f"ep{e + 1:<2d} box/segm" for e in range(epochs)))
    for name, rows in table.items():
        cells = [f"{r['bbox_AP']:.3f}/{r.get('segm_AP', float('nan')):.3f}" for r in rows]
        print(f"{name:{width}}  " + "  ".join(f"{c:13s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="YAML: {recipe: NAME, variants: {name: overrides}}")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--only", nargs="*", help="run these variants only")
    parser.add_argument("--deadline-min", type=float, default=60.0, help="stop all after this")
    parser.add_argument("--summary", type=Path, help="JSON file rewritten while the sweep runs")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return

    spec = yaml.safe_load(Path(args.variants).read_text())
    names = args.only or list(spec["variants"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [
            sys.executable,
            __file__,
            args.variants,
            "--one",
            name,
            "--data-root",
            args.data_root,
            "--out",
            str(out),
            "--threads",
            str(args.threads),
        ]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    start = time.monotonic()
    while any(p.poll() is None for p, _ in procs.values()):
        if time.monotonic() - start > args.deadline_min * 60:
            print(f"deadline of {args.deadline_min} min reached: stopping the variants left")
            for p, _ in procs.values():
                p.kill()
            break
        time.sleep(10)
        if args.summary:
            atomic_write_text(args.summary, json.dumps(collect(out, names)))
    failed = []
    for name, (p, log) in procs.items():
        p.wait()
        log.close()
        if p.returncode not in (0, -9):  # -9: stopped at the deadline, its epochs still count
            failed.append(name)
            tail = (out / f"{name}.log").read_text().splitlines()[-3:]
            print(f"{name}: exit {p.returncode}: {' | '.join(tail)}")
    table = collect(out, names)
    if args.summary:
        atomic_write_text(args.summary, json.dumps(table))
    print(f"{len(names)} variants, {(time.monotonic() - start) / 60:.1f} min")
    print_table(table)
    if failed:
        sys.exit(f"{len(failed)} variant(s) failed: {', '.join(failed)} (see their .log in {out})")


if __name__ == "__main__":
    main()
