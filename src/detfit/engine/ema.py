"""An exponential moving average of the weights, evaluated instead of the raw model.

With a few hundred images the raw weights jitter from batch to batch; their average is a
better model at no training cost (one lerp per tensor per step). The decay ramps up from 0 so
that the average is not dominated by the random initial heads: d = decay * (1 - exp(-n / ramp)).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_model(model: nn.Module, decay: float, ramp_iters: float = 100.0) -> AveragedModel:
    """An ``AveragedModel`` of ``model`` (parameters and buffers) with a ramped decay."""

    def multi_avg_fn(averaged: list[torch.Tensor], current: list[torch.Tensor], n) -> None:
        if not averaged[0].is_floating_point():  # counters such as num_batches_tracked
            torch._foreach_copy_(averaged, current)
            return
        d = decay * (1.0 - math.exp(-float(n) / ramp_iters))
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)
