"""Where a CPU-recipe training iteration and evaluation image spend their time.

    python benchmarks/profile_recipe.py --data-root ../shared/data/PennFudanPed

Runs detfit's Trainer on the CPU recipe (``--iters`` iterations, then the evaluation of
``--eval-images`` images) with wall-clock timers (``time.perf_counter``) around the parts:
forward hooks on the model's transform, backbone, RPN and RoI heads (box pooler, head, predictor;
mask pooler, head, predictor), wrappers around torchvision's loss functions, ``Tensor.backward``,
the optimizer's step hooks, the EMA callback, the wait for the next batch, and in evaluation the
mask pasting and the COCO metric. Each part's own time excludes the parts timed inside it
(the RPN's time excludes its loss). The first ``--skip`` iterations are not counted.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch


class Timers:
    """Nested wall-clock timers: each label's exclusive seconds (children subtracted)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [label, start, child seconds]
        self.enabled = False

    def start(self, label: str) -> None:
        self.stack.append([label, time.perf_counter(), 0.0])

    def stop(self) -> None:
        label, start, children = self.stack.pop()
        took = time.perf_counter() - start
        if self.stack:
            self.stack[-1][2] += took
        if self.enabled:
            self.seconds[label] += took - children

    @contextmanager
    def timed(self, label: str):
        self.start(label)
        try:
            yield
        finally:
            self.stop()

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed_call(*args, **kwargs):
            with self.timed(label):
                return original(*args, **kwargs)

        setattr(owner, name, timed_call)

    def hook(self, module: torch.nn.Module, label: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(label))
        module.register_forward_hook(lambda *_: self.stop())


def instrument(timers: Timers, model: torch.nn.Module, phase: dict) -> None:
    """Timers on the model's parts (torchvision's R-CNN layout)."""
    timers.hook(model.transform, "transform (normalize, resize, batch)")
    timers.hook(model.backbone.body, "backbone")
    timers.hook(model.backbone.fpn, "FPN")
    timers.hook(model.rpn, "RPN")
    heads = model.roi_heads
    for part, label in (
        ("box_roi_pool", "RoI box: pooling"),
        ("box_head", "RoI box: head"),
        ("box_predictor", "RoI box: predictor"),
        ("mask_roi_pool", "RoI mask: pooling"),
        ("mask_head", "RoI mask: head"),
        ("mask_predictor", "RoI mask: predictor"),
    ):
        if getattr(heads, part, None) is not None:
            timers.hook(getattr(heads, part), label)
    timers.hook(heads, "RoI heads: sampling, matching, postprocess")
    model.register_forward_pre_hook(lambda *_: timers.start(f"{phase['name']}: forward, rest"))
    model.register_forward_hook(lambda *_: timers.stop())


def main() -> None:
    import torchvision.models.detection.roi_heads as roi_heads
    import torchvision.models.detection.transform as rcnn_transform
    from torch.utils.data import DataLoader
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from detfit.config import RECIPES, TrainConfig, merge_settings
    from detfit.engine import loop
    from detfit.engine.callbacks import EMA, Callback
    from detfit.engine.trainer import Trainer
    from detfit.eval import coco

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="PennFudanPed (default: detfit's cache)")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=20)
    parser.add_argument("--out", default="/tmp/detfit-profile")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE settings")
    args = parser.parse_args()

    timers = Timers()
    phase = {"name": "train"}
    timers.wrap(roi_heads, "fastrcnn_loss", "losses")
    timers.wrap(roi_heads, "maskrcnn_loss", "losses")
    timers.wrap(RegionProposalNetwork, "compute_loss", "losses")
    timers.wrap(rcnn_transform, "paste_masks_in_image", "mask pasting")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(EMA, "on_step_end", "EMA update")
    for name in ("process", "gather", "evaluate"):
        timers.wrap(coco.CocoEvaluator, name, "COCO metric (results, RLE, COCOeval)")
    original_step = loop.TrainStep.__call__

    def step(self, *a, **k):
        with timers.timed("train: step, rest (reduction, zero_grad, schedule)"):
            return original_step(self, *a, **k)

    loop.TrainStep.__call__ = step
    original_iter = DataLoader.__iter__

    def batches(loader):
        it = original_iter(loader)
        while True:
            with timers.timed("data wait"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    DataLoader.__iter__ = batches

    counts = {"iters": 0}

    class Clock(Callback):
        last = 0.0

        def on_train_start(self, trainer) -> None:
            instrument(timers, trainer.module, phase)
            trainer.optimizer.register_step_pre_hook(lambda *_: timers.start("optimizer step"))
            trainer.optimizer.register_step_post_hook(lambda *_: timers.stop())

        def on_step_end(self, trainer, result) -> None:
            counts["iters"] += 1
            timers.enabled = counts["iters"] >= args.skip
            if counts["iters"] == args.skip:
                self.last = time.perf_counter()
                timers.seconds.clear()
            if counts["iters"] == trainer.iters_per_epoch:
                counts["train_seconds"] = time.perf_counter() - self.last
                counts["timed_iters"] = counts["iters"] - args.skip
                phase["name"] = "eval"
                if trainer.eval_model is not trainer.module:  # the EMA copy is evaluated
                    instrument(timers, trainer.eval_model, phase)
                counts["train"] = dict(timers.seconds)
                timers.seconds.clear()
                self.last = time.perf_counter()

        def on_evaluation(self, trainer, result) -> None:
            counts["eval_seconds"] = time.perf_counter() - self.last
            counts["eval_images"] = result.num_images
            counts["eval"] = dict(timers.seconds)
            timers.enabled = False

    overrides = {
        "epochs": 1,
        "max_iters_per_epoch": args.iters,
        "num_test": args.eval_images,
        "out": str(Path(args.out)),
        "checkpoint_every_iters": None,
    }
    if args.data_root:
        overrides["data_root"] = args.data_root
    settings = merge_settings(RECIPES[args.recipe], overrides, args.set)
    cfg = TrainConfig.from_dict({**settings, "recipe": args.recipe}, "profile settings")
    Trainer(cfg, callbacks=[Clock()], overwrite=True, progress=False, log=lambda _: None).fit()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, recipe {args.recipe}, "
        f"batch {cfg.batch_size}, {cfg.workers} loader process(es); timers: time.perf_counter"
    )
    for what, total, n, unit in (
        ("train", counts["train_seconds"], counts["timed_iters"], "iteration"),
        ("eval", counts["eval_seconds"], counts["eval_images"], "image"),
    ):
        parts = counts[what]
        parts["other (loop, callbacks, untimed)"] = total - sum(parts.values())
        print(f"\n{what}: {total / n:.3f} s per {unit} over {n} {unit}s")
        print(f"{'part':55s} {'ms/' + unit:>12s} {'share':>7s}")
        for label, sec in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"{label:55s} {1000 * sec / n:12.1f} {100 * sec / total:6.1f}%")


if __name__ == "__main__":
    main()
