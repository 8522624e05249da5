"""detfit's Trainer vs the references' own loop: s/training iteration, eval s/image, peak RSS.

    python benchmarks/vs_references.py --data-root ../shared/data/PennFudanPed

Side "refs" re-implements, in this file, what a user of the tutorial runs: the tutorial's
``PennFudanDataset`` (torchvision.io PNG decoding, masks split by instance id, boxes from
``masks_to_boxes``) with its transforms v2 (flip, ToDtype, ToPureTensor), a plain shuffled
DataLoader with the tuple collate, and torchvision references/detection's ``train_one_epoch``
(linear warm-up over the first epoch, reduced loss dict, finiteness check, optional GradScaler,
smoothed-value logging) and ``evaluate`` (COCO ground truth converted from the dataset, per-batch
``loadRes`` + per-image ``evaluateImg`` with RLE-encoded masks, one intra-op thread as the
references set it, then accumulate + summarize). Side "detfit" is ``detfit.Trainer`` on the same
settings: the same model (built by the same builder with the same options), optimizer, batch size,
loader processes, threads, images (detfit's seeded split for both), warm-up and seed, at the
recipe's precision (the CPU recipe's bf16; the references' loop has no CPU autocast, so it runs
fp32 there; ``--precision fp32`` compares the loops at equal arithmetic); one epoch of
``--iters`` iterations, then the evaluation of ``--eval-images`` test images. With ``--plain`` a
third side, "plain", runs the Trainer with the speed-ups switched off
(``detfit.config.SPEED_UPS_OFF``), so one run also shows what they bring.

Each side runs in a fresh child process per round, and rounds interleave (refs, detfit, refs, ...),
so both see the same machine state. s/iteration is the wall time between consecutive optimizer
steps (data wait included), the first ``--skip`` of each run excluded; evaluation s/image is the
wall time of the whole evaluation (ground-truth conversion and the metric included) over the
image count; peak RSS is the child's own maximum resident set.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# the settings both sides share
# ---------------------------------------------------------------------------------------------

SGD = {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.0005}  # the tutorial's optimizer


def shared_config(args: argparse.Namespace, out: str | None = None):
    """detfit's TrainConfig for these settings; the refs side reads model, options and split
    from it too, so both sides build exactly the same model on exactly the same images."""
    from detfit.config import recipe_config

    overrides = {
        "epochs": 1,
        "max_iters_per_epoch": args.iters,
        "num_test": args.eval_images,  # the held-out images both sides evaluate
        "batch_size": args.batch_size,
        "eval_batch_size": 1,
        "workers": args.workers,
        "threads": args.threads,
        "device": args.device,
        "amp": args.amp,
        "seed": 0,
        "optimizer": "sgd",
        **SGD,
        "lr": args.lr,
        "lr_schedule": "constant",
        "ema_decay": None,
        "clip_grad_norm": None,
        "loss_weights": {},
        "photometric": False,
        "hflip_prob": 0.5,
        "checkpoint_every_iters": None,
        "out": out,
    }
    if args.precision:
        overrides["precision"] = args.precision
    if args.model:
        overrides["model"] = args.model
    if args.no_weights:
        overrides["weights"] = overrides["weights_backbone"] = "none"
    if args.data_root:
        overrides["data_root"] = args.data_root
    return recipe_config(args.recipe, **overrides)


# ---------------------------------------------------------------------------------------------
# side "refs": the tutorial's dataset and the references' loop, written out here
# ---------------------------------------------------------------------------------------------


class TutorialPennFudan(torch.utils.data.Dataset):
    """The tutorial's PennFudanDataset."""

    def __init__(self, root: str, transforms) -> None:
        self.root = Path(root)
        self.transforms = transforms
        self.imgs = sorted(os.listdir(self.root / "PNGImages"))
        self.masks = sorted(os.listdir(self.root / "PedMasks"))

    def __getitem__(self, idx: int):
        from torchvision import tv_tensors
        from torchvision.io import read_image
        from torchvision.ops import masks_to_boxes
        from torchvision.transforms.v2 import functional as F

        img = read_image(str(self.root / "PNGImages" / self.imgs[idx]))
        mask = read_image(str(self.root / "PedMasks" / self.masks[idx]))
        obj_ids = torch.unique(mask)[1:]
        masks = (mask == obj_ids[:, None, None]).to(dtype=torch.uint8)
        boxes = masks_to_boxes(masks)
        n = len(obj_ids)
        img = tv_tensors.Image(img)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=F.get_size(img)),
            "masks": tv_tensors.Mask(masks),
            "labels": torch.ones((n,), dtype=torch.int64),
            "image_id": idx,
            "area": (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]),
            "iscrowd": torch.zeros((n,), dtype=torch.int64),
        }
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    def __len__(self) -> int:
        return len(self.imgs)


def tutorial_transform(train: bool):
    from torchvision.transforms import v2 as T

    steps = [T.RandomHorizontalFlip(0.5)] if train else []
    steps += [T.ToDtype(torch.float, scale=True), T.ToPureTensor()]
    return T.Compose(steps)


def tuple_collate(batch):
    return tuple(zip(*batch))


class Smoothed:
    """The references' SmoothedValue: a window median/average and a global average."""

    def __init__(self, window: int = 20) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.total, self.count = 0.0, 0

    def update(self, value: float) -> None:
        self.values.append(value)
        self.total += value
        self.count += 1

    def __str__(self) -> str:
        return f"{statistics.median(self.values):.4f} ({self.total / max(self.count, 1):.4f})"


def refs_train_one_epoch(model, optimizer, loader, device, iters, scaler, stamps, log) -> None:
    """references/detection/engine.py train_one_epoch, epoch 0 (with its warm-up), capped at
    ``iters`` batches; ``stamps`` gets the time after each optimizer step."""
    model.train()
    meters: dict[str, Smoothed] = {}
    warmup_iters = min(1000, len(loader) - 1)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / 1000, total_iters=warmup_iters
    )
    for i, (images, targets) in enumerate(loader):
        if i >= iters:
            break
        images = [image.to(device) for image in images]
        targets = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets
        ]
        with torch.autocast(device.type, enabled=scaler is not None):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        # reduce_dict is the identity in one process
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            sys.exit(f"Loss is {loss_value}, stopping training")
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            optimizer.step()
        scheduler.step()
        for name, value in {"loss": losses, **loss_dict}.items():
            meters.setdefault(name, Smoothed()).update(value.item())
        meters.setdefault("lr", Smoothed(1)).update(optimizer.param_groups[0]["lr"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if i % 10 == 0:
            log(
                f"Epoch: [0] [{i}/{len(loader)}] "
                + "  ".join(f"{k}: {v}" for k, v in meters.items())
            )


def refs_coco_ground_truth(dataset):
    """references/detection/coco_utils.py convert_to_coco_api: every item loaded, masks RLE."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    images, annotations, categories = [], [], set()
    ann_id = 1
    for idx in range(len(dataset)):
        img, targets = dataset[idx]
        image_id = targets["image_id"]
        images.append({"id": image_id, "height": img.shape[-2], "width": img.shape[-1]})
        boxes = targets["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        masks = targets["masks"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
        for i in range(len(boxes)):
            label = int(targets["labels"][i])
            categories.add(label)
            rle = mask_util.encode(masks[i].numpy())
            annotations.append(
                {
                    "image_id": image_id,
                    "bbox": boxes[i].tolist(),
                    "category_id": label,
                    "area": float(targets["area"][i]),
                    "iscrowd": int(targets["iscrowd"][i]),
                    "id": ann_id,
                    "segmentation": rle,
                }
            )
            ann_id += 1
    coco = COCO()
    coco.dataset = {
        "images": images,
        "categories": [{"id": c} for c in sorted(categories)],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def refs_results(predictions: dict, iou_type: str) -> list[dict]:
    """references/detection/coco_eval.py prepare_for_coco_detection / _segmentation."""
    from pycocotools import mask as mask_util

    results = []
    for image_id, pred in predictions.items():
        if len(pred["boxes"]) == 0:
            continue
        boxes = pred["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        scores, labels = pred["scores"].tolist(), pred["labels"].tolist()
        if iou_type == "segm":
            masks = (pred["masks"] > 0.5).numpy()
            rles = [
                mask_util.encode(np.array(m[0, :, :, None], dtype=np.uint8, order="F"))[0]
                for m in masks
            ]
            for rle in rles:
                rle["counts"] = rle["counts"].decode("utf-8")
            extra = [{"segmentation": r} for r in rles]
        else:
            extra = [{"bbox": b} for b in boxes.tolist()]
        results += [
            {"image_id": image_id, "category_id": labels[k], "score": scores[k], **extra[k]}
            for k in range(len(scores))
        ]
    return results


class RefsCocoEvaluator:
    """references/detection/coco_eval.py CocoEvaluator: per batch ``loadRes`` and evaluateImg,
    the per-image results concatenated for one accumulate + summarize."""

    def __init__(self, coco_gt, iou_types) -> None:
        from pycocotools.cocoeval import COCOeval

        self.coco_gt = coco_gt
        self.evals = {t: COCOeval(coco_gt, iouType=t) for t in iou_types}
        self.img_ids: list[int] = []
        self.eval_imgs: dict[str, list[np.ndarray]] = {t: [] for t in iou_types}

    def update(self, predictions: dict) -> None:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        img_ids = list(np.unique(list(predictions.keys())))
        self.img_ids += img_ids
        for iou_type in self.evals:
            results = refs_results(predictions, iou_type)
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = self.coco_gt.loadRes(results) if results else COCO()
                batch_eval = COCOeval(self.coco_gt, coco_dt, iouType=iou_type)
                batch_eval.params.imgIds = img_ids
                batch_eval.evaluate()
            shape = (len(batch_eval.params.catIds), len(batch_eval.params.areaRng), len(img_ids))
            self.eval_imgs[iou_type].append(np.asarray(batch_eval.evalImgs).reshape(shape))

    def summarize(self) -> dict[str, list[float]]:
        stats = {}
        for iou_type, coco_eval in self.evals.items():
            eval_imgs = np.concatenate(self.eval_imgs[iou_type], axis=2)
            img_ids, order = np.unique(self.img_ids, return_index=True)
            coco_eval.params.imgIds = list(img_ids)
            coco_eval._paramsEval = copy.deepcopy(coco_eval.params)
            coco_eval.evalImgs = list(eval_imgs[..., order].flatten())
            with contextlib.redirect_stdout(io.StringIO()):
                coco_eval.accumulate()
                coco_eval.summarize()
            stats[iou_type] = [float(s) for s in coco_eval.stats]
        return stats


@torch.inference_mode()
def refs_evaluate(model, loader, device, iou_types) -> dict[str, list[float]]:
    """references/detection/engine.py evaluate (one intra-op thread, as the references set it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.eval()
    evaluator = RefsCocoEvaluator(refs_coco_ground_truth(loader.dataset), iou_types)
    for images, targets in loader:
        images = [img.to(device) for img in images]
        outputs = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        outputs = [{k: v.to("cpu") for k, v in t.items()} for t in outputs]
        evaluator.update({t["image_id"]: o for t, o in zip(targets, outputs)})
    stats = evaluator.summarize()
    torch.set_num_threads(threads)
    return stats


def run_refs(args: argparse.Namespace) -> dict:
    from detfit.data.batching import split_indices
    from detfit.data.loaders import build_datasets
    from detfit.data.pennfudan import resolve_pennfudan
    from detfit.engine.trainer import seed_everything
    from detfit.models import build_model
    from detfit.models.policy import options_for_data
    from detfit.models.registry import iou_types

    cfg = shared_config(args)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    seed_everything(cfg.seed)
    data = build_datasets(cfg, download=False, log=lambda _: None)  # the detfit side's options
    options = options_for_data(cfg, data, log=lambda _: None)
    model = build_model(
        cfg.model, 2, weights=cfg.weights, weights_backbone=cfg.weights_backbone, **options
    ).to(device)
    root = resolve_pennfudan(cfg.data_root, download=False)
    train_full = TutorialPennFudan(root, tutorial_transform(True))
    test_full = TutorialPennFudan(root, tutorial_transform(False))
    train_idx, test_idx = split_indices(len(train_full), cfg.num_test, cfg.split_seed)
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(train_full, train_idx),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        collate_fn=tuple_collate,
    )
    test_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(test_full, test_idx),
        batch_size=1,
        shuffle=False,
        num_workers=cfg.workers,
        collate_fn=tuple_collate,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, **{**SGD, "lr": cfg.lr})
    scaler = torch.amp.GradScaler("cuda") if cfg.amp else None
    stamps: list[float] = []
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731 - the references print these
    start = time.perf_counter()
    iters = cfg.max_iters_per_epoch
    refs_train_one_epoch(model, optimizer, train_loader, device, iters, scaler, stamps, log)
    eval_start = time.perf_counter()
    stats = refs_evaluate(model, test_loader, device, iou_types(cfg.model))
    eval_seconds = time.perf_counter() - eval_start
    return summary(stamps, start, eval_seconds, len(test_loader.dataset), args.skip, stats)


# ---------------------------------------------------------------------------------------------
# side "detfit": the Trainer, timed by a callback
# ---------------------------------------------------------------------------------------------


def run_detfit(args: argparse.Namespace) -> dict:
    from detfit.config import SPEED_UPS_OFF
    from detfit.data.pennfudan import resolve_pennfudan
    from detfit.engine.callbacks import Callback
    from detfit.engine.trainer import Trainer

    class Stamps(Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.evaluated = 0.0
            self.start = 0.0

        def on_epoch_start(self, trainer) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, trainer, result) -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            self.steps.append(time.perf_counter())

        def on_evaluation(self, trainer, result) -> None:
            self.evaluated = time.perf_counter()
            self.stats = {k: list(v.values()) for k, v in result.stats.items()}
            self.images = result.num_images

    with tempfile.TemporaryDirectory() as tmp:
        cfg = shared_config(args, out=str(Path(tmp) / "run"))
        # detfit's warm-up over the same iterations as the references' (the whole first epoch)
        images = len(
            list((resolve_pennfudan(cfg.data_root, download=False) / "PNGImages").iterdir())
        )
        num_train = images - cfg.num_test
        warmup = min(1000, math.ceil(num_train / cfg.batch_size) - 1)
        cfg = cfg.model_copy(update={"warmup_iters": warmup, "warmup_factor": 1.0 / 1000})
        if args.side == "plain":
            cfg = cfg.model_copy(update=SPEED_UPS_OFF)
        stamps = Stamps()
        trainer = Trainer(cfg, callbacks=[stamps], progress=False, log=lambda _: None)
        trainer.fit()
    eval_seconds = stamps.evaluated - stamps.steps[-1]
    return summary(stamps.steps, stamps.start, eval_seconds, stamps.images, args.skip, stamps.stats)


def summary(stamps, start, eval_seconds, images, skip, stats) -> dict:
    gaps = np.diff([start, *stamps])[skip:]
    return {
        "seconds_per_iter": float(np.mean(gaps)),
        "iters_timed": len(gaps),
        "eval_seconds_per_image": eval_seconds / max(images, 1),
        "eval_images": images,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stats": stats,
    }


# ---------------------------------------------------------------------------------------------
# the parent: interleaved rounds, one child per side per round
# ---------------------------------------------------------------------------------------------


def child_command(side: str, argv: list[str]) -> list[str]:
    return [sys.executable, __file__, "--side", side, *argv]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="PennFudanPed (default: detfit's cache)")
    parser.add_argument("--recipe", default="cpu", help="detfit recipe giving model and options")
    parser.add_argument("--model", help="another model (e.g. maskrcnn_resnet50_fpn)")
    parser.add_argument(
        "--no-weights", action="store_true", help="random init (no COCO or ImageNet file)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="detfit's precision (default: the recipe's, bf16 for cpu); the refs side runs fp32, "
        "or CUDA autocast with --amp, as the references do",
    )
    parser.add_argument("--lr", type=float, default=SGD["lr"], help="SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iters", type=int, default=30, help="training iterations per run")
    parser.add_argument("--skip", type=int, default=3, help="first iterations not timed")
    parser.add_argument("--eval-images", type=int, default=20, help="held-out images (num_test)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--plain", action="store_true", help="also detfit with the speed-ups off (side plain)"
    )
    parser.add_argument("--side", choices=("refs", "detfit", "plain"), help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.side:
        result = (run_refs if args.side == "refs" else run_detfit)(args)
        print(json.dumps(result))
        return

    argv = [a for a in sys.argv[1:]]
    from detfit.models.precision import chosen_precision

    cfg = shared_config(args)
    detfit_precision = chosen_precision(cfg.precision, cfg.amp, torch.device(args.device))
    print(
        f"torch {torch.__version__}; device {args.device}{' +AMP' if args.amp else ''}; detfit "
        f"precision {detfit_precision} (refs: {'AMP' if args.amp else 'fp32'}); recipe "
        f"{args.recipe}{' model ' + args.model if args.model else ''}; batch {args.batch_size}; "
        f"{args.workers} loader process(es); {args.threads} threads; {args.iters} iterations "
        f"({args.skip} untimed) and {args.eval_images} eval images per run; {args.rounds} rounds"
    )
    sides = ("refs", "detfit", "plain") if args.plain else ("refs", "detfit")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides:
            proc = subprocess.run(
                child_command(side, argv), capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                sys.exit(f"{side} round {r + 1} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[side].append(result)
            print(
                f"round {r + 1} {side:6s}: {result['seconds_per_iter']:.3f} s/iter, "
                f"eval {result['eval_seconds_per_image']:.3f} s/image, "
                f"peak RSS {result['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    mean = {
        side: {
            k: statistics.mean(r[k] for r in rs)
            for k in ("seconds_per_iter", "eval_seconds_per_image", "peak_rss_mb")
        }
        for side, rs in runs.items()
    }
    b = mean["detfit"]
    images_per_iter = args.batch_size
    print("side    s/iter  images/s  eval s/image  peak RSS MiB")
    for side, m in mean.items():
        print(
            f"{side:6s}  {m['seconds_per_iter']:6.3f}  {images_per_iter / m['seconds_per_iter']:8.2f}"
            f"  {m['eval_seconds_per_image']:12.3f}  {m['peak_rss_mb']:12.0f}"
        )
    for base in ("refs", "plain") if args.plain else ("refs",):
        a = mean[base]
        print(
            f"detfit / {base}: training x{a['seconds_per_iter'] / b['seconds_per_iter']:.2f} "
            f"iterations/s, evaluation x{a['eval_seconds_per_image'] / b['eval_seconds_per_image']:.2f}"
            f" images/s, peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
