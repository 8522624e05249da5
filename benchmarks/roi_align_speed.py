"""torchvision's RoIAlign kernel against detfit's sparse one (``sparse_roi_align``), forward and
backward, on the CPU recipe's pooling shapes; prints both times, their ratio and the largest
differences. Run on a quiet machine:

    python benchmarks/roi_align_speed.py [--reps 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from detfit.models.roi_align import roi_align as sparse_roi_align

# (name, features (B, C, H, W), RoIs, output size, spatial scale): the recipe at min_size 416
CASES = [
    ("box pooler, stride 8", (2, 128, 52, 80), 128, (7, 7), 1 / 8),
    ("box pooler, stride 16", (2, 128, 26, 40), 128, (7, 7), 1 / 16),
    ("mask pooler, stride 8", (2, 128, 52, 80), 32, (14, 14), 1 / 8),
]


def rois_for(shape: tuple[int, ...], count: int, scale: float, gen: torch.Generator):
    batch, _, height, width = shape
    xy = torch.rand(count, 2, generator=gen) * torch.tensor([width, height]) / scale
    wh = torch.rand(count, 2, generator=gen) * 200 + 8
    image = torch.randint(0, batch, (count, 1), generator=gen).float()
    return torch.cat([image, xy, xy + wh], 1)


def timed(
    fn, features, rois, size, scale, grad, reps: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Median seconds of forward + backward over ``reps`` (after one untimed call)."""
    times = []
    for i in range(reps + 1):
        x = features.detach().requires_grad_()
        start = time.perf_counter()
        out = fn(x, rois, size, scale, 2)
        out.backward(grad)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out.detach(), x.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, channels_last")
    print("case                      torchvision ms  sparse ms  ratio  max |d out|  max |d grad|")
    gen = torch.Generator().manual_seed(0)
    for name, shape, count, size, scale in CASES:
        features = torch.randn(*shape, generator=gen).contiguous(memory_format=torch.channels_last)
        rois = rois_for(shape, count, scale, gen)
        grad = torch.randn(count, shape[1], *size, generator=gen)
        tv, tv_out, tv_grad = timed(
            torchvision_roi_align, features, rois, size, scale, grad, args.reps
        )
        sp, sp_out, sp_grad = timed(sparse_roi_align, features, rois, size, scale, grad, args.reps)
        print(
            f"{name:24s}  {tv * 1000:14.1f}  {sp * 1000:9.1f}  {tv / sp:5.1f}x  "
            f"{(tv_out - sp_out).abs().max():11.1e}  {(tv_grad - sp_grad).abs().max():12.1e}"
        )


if __name__ == "__main__":
    main()
