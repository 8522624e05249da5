"""Training s/iteration and evaluation s/image: the CPU recipe's model vs the hand-written baseline.

The baseline is what the tutorial's path gives on this backbone: torchvision's MobileNetV2-FPN
(`mobilenet_backbone`) under a default MaskRCNN, min_size 800, all default RoI settings. Both run
on the same real Penn-Fudan images, in one process, one after the other; the script prints both
and their ratio. Run on a quiet machine:

    python benchmarks/iteration_speed.py --data-root ../shared/data/PennFudanPed
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.models import MobileNet_V2_Weights
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone

from detfit.config import recipe_config
from detfit.data import PennFudanDataset, collate_fn, eval_transforms, train_transforms
from detfit.models import build_model


def baseline_model() -> torch.nn.Module:
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v2",
        weights=MobileNet_V2_Weights.IMAGENET1K_V1,
        fpn=True,
        trainable_layers=3,
    )
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors)


def recipe_model() -> torch.nn.Module:
    cfg = recipe_config("cpu")
    return build_model(
        cfg.model,
        2,
        weights=cfg.weights,
        weights_backbone=cfg.weights_backbone,
        **cfg.model_options,
    )


def measure(model, train_ds, test_ds, iters: int, eval_images: int, warmup: int = 2):
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=2, shuffle=True, collate_fn=collate_fn
    )
    model.train()
    times = []
    batches = iter(loader)
    for i in range(iters + warmup):
        images, targets = next(batches)
        start = time.perf_counter()
        loss = sum(model(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.eval()
    eval_times = []
    with torch.inference_mode():
        for i in range(eval_images):
            image, _ = test_ds[i]
            start = time.perf_counter()
            model([image])
            eval_times.append(time.perf_counter() - start)
    return sum(times) / len(times), sum(eval_times) / len(eval_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--eval-images", type=int, default=10)
    args = parser.parse_args()
    train_ds = PennFudanDataset(args.data_root, train_transforms())
    test_ds = PennFudanDataset(args.data_root, eval_transforms())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iters} train "
        f"iterations (batch 2) and {args.eval_images} eval images each"
    )
    results = {}
    for name, make in (("baseline", baseline_model), ("detfit cpu recipe", recipe_model)):
        results[name] = measure(make(), train_ds, test_ds, args.iters, args.eval_images)
        train_s, eval_s = results[name]
        print(f"{name:18s} train {train_s:.2f} s/iter   eval {eval_s:.3f} s/image")
    (bt, be), (rt, re_) = results["baseline"], results["detfit cpu recipe"]
    print(f"speed-up: train x{bt / rt:.2f}, eval x{be / re_:.2f}")


if __name__ == "__main__":
    main()
