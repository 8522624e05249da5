"""Helpers for the export and predict tests: tiny checkpoints whose scores are spread out (random
heads give near-equal scores, so which detection survives a cut-off would be a coin toss) and
test images of several sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from detfit.checkpoint import model_info
from detfit.models import build_model

CLASSES = ["__background__", "cat", "dog"]
CATEGORY_IDS = [0, 17, 18]
# sizes where float32 and float64 resize arithmetic disagree (100x60 at min_size 64) and others
SIZES = [(70, 90), (100, 60), (50, 120), (96, 128)]


def spread_heads(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-initialise every layer outside the backbone, biases too, so scores differ clearly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            layer = isinstance(module, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))
            if layer and not name.startswith("backbone"):
                fan_in = module.weight[0].numel()
                module.weight.normal_(std=(2.0 / fan_in) ** 0.5, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(std=0.5, generator=gen)
    return model


def tiny_checkpoint(
    path: Path, name: str, options: dict, config: dict | None = None, seed: int = 0
) -> Path:
    """A detfit checkpoint (model, model_info, config) of a random, spread-out tiny model."""
    torch.manual_seed(seed)
    model = build_model(name, len(CLASSES), weights=None, weights_backbone=None, **options)
    spread_heads(model, seed).eval()
    info = model_info(name, len(CLASSES), CLASSES, options, model)
    info["category_ids"] = CATEGORY_IDS
    ckpt = {"model": model.state_dict(), "model_info": info, "config": config or {}}
    ckpt["optimizer"] = {"state": {"big": torch.zeros(1000, 100)}}  # what --strip drops
    torch.save(ckpt, path)
    return path


def write_images(folder: Path, sizes=SIZES, seed: int = 0) -> list[Path]:
    """PNG images of the given sizes: dark noise with a few bright rectangles."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        for _ in range(3):
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            pixels[y0 : y0 + h // 3, x0 : x0 + w // 4] = rng.integers(120, 256, 3)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths
