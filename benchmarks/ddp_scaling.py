"""Training images per second: 1 process vs N processes under torchrun, same global batch.

    python benchmarks/ddp_scaling.py --data-root ../shared/data/PennFudanPed

Each variant is a real ``detfit train`` launched with torchrun: the CPU recipe's model and
settings, ``max_iters_per_epoch`` iterations, 2 epochs; the figure is epoch 2's training time per
iteration (epoch 1 warms up allocators and caches), so data loading, forward, backward, the
gradient all-reduce and the optimizer step are all in it, and evaluation is not. The global batch
is the same for every variant (N processes x global/N images), and the CPU's cores are split
evenly (``threads = cores / N``). On a CUDA machine the variants use 1 and all GPUs instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def launch(nproc: int, args: argparse.Namespace, out: Path, threads: int | None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    cmd += ["-m", "detfit", "train", "--recipe", args.recipe, "--epochs", "2", "--quiet"]
    cmd += ["--out", str(out), "--batch-size", str(args.global_batch // nproc)]
    cmd += ["--workers", str(args.workers), "--set", f"max_iters_per_epoch={args.iters}"]
    cmd += ["--set", f"num_test={args.num_test}"]
    if threads:
        cmd += ["--set", f"threads={threads}"]
    for setting in args.set:
        cmd += ["--set", setting]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    row = json.loads((out / "metrics.json").read_text())[-1]
    return {
        "processes": nproc,
        "batch_per_process": args.global_batch // nproc,
        "threads_per_process": threads,
        "seconds_per_iter": row["train_seconds_per_iter"],
        "images_per_second": args.global_batch / row["train_seconds_per_iter"],
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="PennFudanPed (default: detfit's cache)")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=12, help="iterations per epoch")
    parser.add_argument("--num-test", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--processes", type=int, default=None, help="N (default: 2, or all GPUs)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every variant")
    args = parser.parse_args()

    gpus = torch.cuda.device_count()
    many = args.processes or (gpus if gpus else 2)
    cores = os.cpu_count() or 1
    print(
        f"torch {torch.__version__}; {f'{gpus} GPU(s)' if gpus else 'CPU only'}; {cores} cores; "
        f"global batch {args.global_batch}; recipe {args.recipe}; {args.iters} iterations/epoch"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in dict.fromkeys((1, many)):
            threads = None if gpus else max(1, cores // nproc)
            results.append(launch(nproc, args, Path(tmp) / f"n{nproc}", threads))
    print("processes  batch/process  threads/process  s/iteration  images/s")
    for r in results:
        print(
            f"{r['processes']:9d}  {r['batch_per_process']:13d}  {r['threads_per_process'] or '-':>15}"
            f"  {r['seconds_per_iter']:11.3f}  {r['images_per_second']:8.2f}"
        )
    if len(results) == 2:
        ratio = results[1]["images_per_second"] / results[0]["images_per_second"]
        print(f"{results[1]['processes']} processes / 1 process: {ratio:.2f}x images per second")


if __name__ == "__main__":
    main()
