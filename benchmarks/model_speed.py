"""Every architecture on this CPU at the same image size: training seconds per iteration
(batch 2, SGD), inference seconds per image, and peak RSS -- the table to pick a model by.

    python benchmarks/model_speed.py --out src/detfit/models/cpu_speed.json

Each model runs in its own process (so peak RSS is its own), built as fine-tuning builds it:
torchvision's builder loading a "pretrained" file (this machine has no COCO weights; the file
holds the builder's own initial tensors, which costs the same time as real weights), so frozen
stages and FrozenBatchNorm are those of a real fine-tuning run. Images: 2 x 3x480x640 with 3
objects each; R-CNN/RetinaNet/FCOS resize to min_size 512 (max 853); SSD300 and SSDLite keep
their fixed 300/320 px inputs. ``detfit models --speed`` prints the saved table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODELS = [
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v2",
    "maskrcnn_mobilenet_v2_fpn",
    "fasterrcnn_resnet18_fpn",
    "retinanet_resnet18_fpn",
    "fcos_mobilenet_v3_large_fpn",
]
SIZE = {"min_size": 512, "max_size": 853}


def synthetic_batch(with_masks: bool, num_keypoints: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(2):
        images.append(torch.rand(3, 480, 640, generator=gen))
        boxes = torch.tensor([[50.0, 60, 200, 400], [300, 100, 420, 380], [480, 50, 600, 300]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 1, 1])}
        if with_masks:
            masks = torch.zeros(3, 480, 640, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            target["masks"] = masks
        if num_keypoints:
            xy = torch.rand(3, num_keypoints, 2, generator=gen)
            x = boxes[:, None, 0] + xy[..., 0] * (boxes[:, None, 2] - boxes[:, None, 0])
            y = boxes[:, None, 1] + xy[..., 1] * (boxes[:, None, 3] - boxes[:, None, 1])
            target["keypoints"] = torch.stack([x, y, torch.ones_like(x)], -1)
        targets.append(target)
    return images, targets


def pretrained_like_file(name: str, folder: Path) -> dict:
    """Build arguments that load a file the way fine-tuning loads COCO/ImageNet weights."""
    import torch
    from torchvision.models import detection as tvd
    from torchvision.models import get_model

    from detfit.models import get_spec

    spec = get_spec(name)
    path = folder / f"{name}.pth"
    if spec.situation == "A":
        torch.save(getattr(tvd, name)(weights=None, weights_backbone=None).state_dict(), path)
        return {"weights": str(path)}
    torch.save(get_model(spec.backbone, weights=None).state_dict(), path)
    return {"weights": None, "weights_backbone": str(path)}


def measure_one(name: str, iters: int) -> dict:
    import torch

    from detfit.models import build_model, get_spec

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = get_spec(name)
    options = {} if name.startswith("ssd") else dict(SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(name, 2, **pretrained_like_file(name, Path(tmp)), **options)
    images, targets = synthetic_batch(spec.has_masks, 17 if spec.has_keypoints else 0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    model.train()
    times = []
    for i in range(iters + 1):  # the first iteration warms up allocators and caches
        start = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    model.eval()
    infer = []
    with torch.inference_mode():
        for i in range(iters + 1):
            start = time.perf_counter()
            model([images[i % 2]])
            if i:
                infer.append(time.perf_counter() - start)
    return {
        "model": name,
        "train_s_per_iter": round(sorted(times)[len(times) // 2], 3),
        "infer_s_per_image": round(sorted(infer)[len(infer) // 2], 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 1),
        "input": "300 px fixed"
        if name.startswith("ssd300")
        else "320 px fixed"
        if name.startswith("ssdlite")
        else "min 512 / max 853",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--iters", type=int, default=4, help="timed iterations (median kept)")
    parser.add_argument("--out", type=Path, help="write the table as JSON (detfit models --speed)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.iters)))
        return
    import torch

    rows = []
    header = f"{'model':40s} {'train s/it':>10s} {'infer s/img':>11s} {'peak RSS MiB':>12s}  input"
    print(f"torch {torch.__version__}, 2 threads, batch 2; median of {args.iters} iterations")
    print(header)
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--iters", str(args.iters)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name:40s} failed: {done.stderr.strip().splitlines()[-1]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name:40s} {row['train_s_per_iter']:10.2f} {row['infer_s_per_image']:11.2f} "
            f"{row['peak_rss_mib']:12d}  {row['input']}"
        )
    if args.out:
        from detfit.fileio import atomic_write_text

        machine = (
            f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        )
        payload = {"machine": machine, "command": " ".join(sys.argv), "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
