"""Penn-Fudan-shaped synthetic data (shapes on noise, instance-id masks) for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_pennfudan(
    root: str | Path,
    num_images: int = 6,
    size: tuple[int, int] = (64, 80),
    max_instances: int = 3,
    seed: int = 0,
) -> Path:
    """Write ``root/PennFudanPed/{PNGImages,PedMasks}`` and return that folder.

    Each image is noise with 1..max_instances filled upright rectangles ("pedestrians") of
    distinct colours; the mask PNG holds instance ids 1..n, as the real set does. Heights and
    widths vary a little per image so aspect-ratio grouping has something to group.
    """
    rng = np.random.default_rng(seed)
    out = Path(root) / "PennFudanPed"
    (out / "PNGImages").mkdir(parents=True, exist_ok=True)
    (out / "PedMasks").mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        h = size[0] + int(rng.integers(0, size[0] // 4 + 1))
        w = size[1] + int(rng.integers(-(size[1] // 4), size[1] // 4 + 1))
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        for k in range(1, int(rng.integers(1, max_instances + 1)) + 1):
            bh = int(rng.integers(h // 3, h // 3 * 2 + 1))
            bw = int(rng.integers(max(2, w // 8), max(3, w // 4) + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            x0 = int(rng.integers(0, w - bw + 1))
            region = mask[y0 : y0 + bh, x0 : x0 + bw]
            region[region == 0] = k  # earlier instances stay in front
            image[mask == k] = rng.integers(120, 256, 3, dtype=np.uint8)
        name = f"FudanPed{i + 1:05d}"
        Image.fromarray(image).save(out / "PNGImages" / f"{name}.png")
        Image.fromarray(mask).save(out / "PedMasks" / f"{name}_mask.png")
    return out
