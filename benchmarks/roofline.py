"""How far a CPU-recipe iteration is from this machine's limit: FLOPs per part, time per part,
achieved GFLOP/s and its share of the measured peak, for one training iteration and one
evaluation image, in fp32 and bf16 autocast.

    python benchmarks/roofline.py --threads 2                 # the CPU recipe's model
    python benchmarks/roofline.py --tiny --iters 1 --peak-size 256   # a smoke run in seconds

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix products and
the other ops it knows; a multiply-add counts 2), per module: backbone (MobileNetV2 body), FPN,
RPN, RoI heads, and the backward pass as a whole (with a corrected formula for grouped
convolutions, see conv_backward_flops). RoIAlign's own arithmetic (a few multiply-adds per bin and
channel) is not counted: FlopCounterMode knows no formula for torchvision's kernel. Times come
from forward hooks around the same modules (the CPU runs synchronously), the backward pass timed
as one call; each is the median of ``--iters`` iterations after one warm-up. The model is the
one training runs: the CPU recipe's settings and speed-ups (``speed_up``), a batch of
``--batch`` random images of ``--size`` with a few boxes and masks each, in training mode with its
RoI sampling.

The peak is measured, not taken from a datasheet: a large square matrix product and a 3x3
convolution (channels_last, as the model runs), fp32 and bf16, the best of a few runs. A part's
share of peak is its GFLOP/s over the best fp32 (or bf16) peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = {  # label: attribute path in a torchvision R-CNN
    "backbone": "backbone.body",
    "fpn": "backbone.fpn",
    "rpn": "rpn",
    "roi_heads": "roi_heads",
}


def peak_gflops(dtype: torch.dtype, size: int, repeat: int = 3) -> dict[str, float]:
    """Best GFLOP/s of an ``size`` x ``size`` matrix product and of a 3x3 convolution."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    channels, side = max(32, size // 8), max(16, size // 16)
    x = torch.randn(4, channels, side, side, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3, generator=gen).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    work = {
        "matmul": (lambda: a @ b, 2 * size**3),
        "conv3x3": (
            lambda: torch.nn.functional.conv2d(x, w, padding=1),
            2 * 4 * channels * side * side * channels * 9,
        ),
    }
    result = {}
    with torch.inference_mode():
        for name, (run, flops) in work.items():
            run()  # warm-up: oneDNN picks and caches its kernel
            best = min(_seconds(run) for _ in range(repeat))
            result[name] = flops / best / 1e9
    return result


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def build(tiny: bool) -> torch.nn.Module:
    from detfit.config import recipe_config
    from detfit.models import build_model
    from detfit.models.precision import keep_fp32_where_needed
    from detfit.models.speedups import speed_up

    cfg = recipe_config("cpu")
    options = dict(cfg.model_options)
    weights_backbone = cfg.weights_backbone
    if tiny:
        options.update(min_size=64, max_size=96, fpn_channels=32, mask_head_channels=32)
        weights_backbone = None
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, weights=None, weights_backbone=weights_backbone, **options)
    speed_up(
        model,
        torch.device("cpu"),
        fold_frozen_bn=cfg.fold_frozen_bn,
        memory_format=cfg.memory_format,
        sparse_roi_align=cfg.sparse_roi_align,
    )
    return keep_fp32_where_needed(model)


def inputs(batch: int, height: int, width: int):
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=gen))
        boxes, masks = [], torch.zeros(3, height, width, dtype=torch.uint8)
        for k in range(3):  # upright "pedestrians", as Penn-Fudan's
            x0 = int(torch.randint(0, width // 2, (1,), generator=gen))
            y0 = int(torch.randint(0, height // 3, (1,), generator=gen))
            x1, y1 = x0 + width // 6, y0 + height // 2
            boxes.append([x0, y0, x1, y1])
            masks[k, y0:y1, x0:x1] = 1
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.ones(3, dtype=torch.int64),
                "masks": masks,
            }
        )
    return images, targets


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


class PartTimer:
    """Seconds spent inside each of PARTS' modules, by forward hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.handles = []
        for label, path in PARTS.items():
            module = _module(model, path)
            self.handles.append(module.register_forward_pre_hook(self._start(label)))
            self.handles.append(module.register_forward_hook(self._stop(label)))
        self.started: dict[str, float] = {}

    def _start(self, label):
        def hook(module, args):
            self.started[label] = time.perf_counter()

        return hook

    def _stop(self, label):
        def hook(module, args, output):
            self.seconds[label] += time.perf_counter() - self.started.pop(label)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def conv_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
    _output_padding, _groups, output_mask, out_shape=None,
) -> int:  # fmt: skip
    """A convolution's backward: the forward's FLOPs once per gradient computed (input, weight).

    torch's own formula ignores ``groups`` in the backward pass and counts a depthwise
    convolution's backward as 33x its forward (measured, 32 channels); MobileNetV2 is mostly
    depthwise and pointwise convolutions."""
    spatial = (x_shape if transposed else grad_out_shape)[2:]
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    fixed = {torch.ops.aten.convolution_backward: conv_backward_flops}
    return FlopCounterMode(display=False, custom_mapping=fixed)


@contextlib.contextmanager
def dense_roi_align(model: torch.nn.Module):
    """torchvision's RoIAlign while FLOPs are counted: FlopCounterMode counts the sparse RoIAlign's
    product as a dense one (every pixel of the map per bin), thousands of times its real work."""
    from torchvision.ops import MultiScaleRoIAlign

    from detfit.models.roi_align import SparseMultiScaleRoIAlign

    swapped = [m for m in model.modules() if type(m) is SparseMultiScaleRoIAlign]
    for module in swapped:
        module.__class__ = MultiScaleRoIAlign
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = SparseMultiScaleRoIAlign


def flops_by_part(counter) -> dict[str, int]:
    """FlopCounterMode's per-module totals, summed under PARTS' labels (module names there are
    dotted paths from the top module's class name)."""
    counts = counter.get_flop_counts()
    top = next(k for k in counts if k != "Global" and "." not in k)
    found = {}
    for label, path in PARTS.items():
        ops = counts.get(f"{top}.{path}", {})
        found[label] = int(sum(ops.values()))
    found["total_forward"] = int(sum(counts.get("Global", {}).values()))
    return found


def train_iteration(model, images, targets, dtype, iters: int) -> dict:
    from detfit.models.precision import autocast

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(timer: PartTimer | None = None) -> tuple[float, float]:
        torch.manual_seed(1)
        start = time.perf_counter()
        with autocast("cpu", dtype):
            loss = sum(model(images, targets).values())
        forward = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss.backward()
        backward = time.perf_counter() - start
        optimizer.step()
        return forward, backward

    step()  # warm-up
    with dense_roi_align(model):
        with flop_counter() as forward_counter:
            torch.manual_seed(1)
            with autocast("cpu", dtype):
                loss = sum(model(images, targets).values())
        with flop_counter() as backward_counter:
            loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = flops_by_part(forward_counter)
    flops["backward"] = int(sum(backward_counter.get_flop_counts().get("Global", {}).values()))
    runs = []
    for _ in range(iters):
        timer = PartTimer(model)
        forward, backward = step(timer)
        timer.remove()
        runs.append({**timer.seconds, "total_forward": forward, "backward": backward})
    seconds = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in flops}
    return {"flops": flops, "seconds": seconds}


def eval_image(model, image, dtype, iters: int) -> dict:
    from detfit.models.precision import autocast

    model.eval()
    with torch.inference_mode(), autocast("cpu", dtype):
        model([image])  # warm-up
        with dense_roi_align(model), flop_counter() as counter:
            model([image])
        flops = flops_by_part(counter)
        runs = []
        for _ in range(iters):
            timer = PartTimer(model)
            start = time.perf_counter()
            model([image])
            total = time.perf_counter() - start
            timer.remove()
            runs.append({**timer.seconds, "total_forward": total})
    seconds = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in flops}
    return {"flops": flops, "seconds": seconds}


def table(title: str, result: dict, peak: float) -> list[str]:
    lines = [
        title,
        f"  {'part':14s} {'GFLOP':>8s} {'seconds':>8s} {'GFLOP/s':>8s} {'% of peak':>9s}",
    ]
    for part, flops in result["flops"].items():
        seconds = result["seconds"].get(part, 0.0)
        rate = flops / seconds / 1e9 if seconds > 0 else 0.0
        lines.append(
            f"  {part:14s} {flops / 1e9:8.2f} {seconds:8.3f} {rate:8.1f} {100 * rate / peak:8.1f}%"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=2, help="training images per iteration")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"), help="image size"
    )
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix side for the peak")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from detfit.models.precision import autocast_dtype

    torch.set_num_threads(args.threads)
    model = build(args.tiny)
    images, targets = inputs(args.batch, *args.size)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
        f"{'tiny model' if args.tiny else 'CPU recipe model'}, batch {args.batch} at "
        f"{args.size[0]}x{args.size[1]}, median of {args.iters}"
    )
    report: dict = {"threads": args.threads, "peak_gflops": {}, "runs": {}}
    for name in args.precisions:
        dtype = autocast_dtype(name, torch.device("cpu"))
        if name != "fp32" and dtype is None:
            continue  # autocast_dtype said why
        peak = peak_gflops(dtype or torch.float32, args.peak_size)
        report["peak_gflops"][name] = peak
        best = max(peak.values())
        print(
            f"\n{name} peak: matmul {peak['matmul']:.1f} GFLOP/s, conv3x3 {peak['conv3x3']:.1f}"
            f" GFLOP/s"
        )
        train = train_iteration(model, images, targets, dtype, args.iters)
        evaluation = eval_image(model, images[0], dtype, args.iters)
        report["runs"][name] = {"train_iteration": train, "eval_image": evaluation}
        print("\n".join(table(f"{name} training iteration (batch {args.batch})", train, best)))
        print("\n".join(table(f"{name} evaluation, one image", evaluation, best)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
