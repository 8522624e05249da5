"""Turn a TrainConfig into the optimizer and learning-rate schedule of a run (its datasets and
loaders are built by :mod:`detfit.data.loaders`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from detfit.config import TrainConfig


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate the optimizer gets: ``lr``, times the number of processes when
    ``lr_scaling`` is ``linear`` (``lr`` then being meant for one process's batch)."""
    return cfg.lr * world_size if cfg.lr_scaling == "linear" else cfg.lr


def build_optimizer(
    cfg: TrainConfig, model: torch.nn.Module, lr: float | None = None
) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over the trainable parameters.

    ``fused_optimizer``: torch's fused step (one kernel over all tensors; 4-5x faster than the
    per-tensor loop on the CPU recipe) where torch has one for the device, the per-tensor step
    otherwise. Both compute the same update up to rounding (tests/test_speedups.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        kind: type[torch.optim.Optimizer] = torch.optim.SGD
        options: dict[str, Any] = {"momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    else:  # adamw
        kind, options = torch.optim.AdamW, {"weight_decay": cfg.weight_decay}
    if cfg.fused_optimizer and params:
        try:
            return kind(params, lr=lr, fused=True, **options)
        except RuntimeError:  # no fused kernel for this device in this torch (CPU before 2.4)
            pass
    return kind(params, lr=lr, **options)


def build_scheduler(
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    iters_per_epoch: int,
    epochs: Callable[[], int] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-iteration schedule: linear warm-up (within the first epoch), then the chosen decay.

    ``step`` and ``multistep`` count epochs like the tutorial's StepLR/MultiStepLR. ``epochs``:
    where the schedule ends, asked at every step (a time budget plans it while training);
    None: ``cfg.epochs``.
    """
    warmup = max(1, min(cfg.warmup_iters, iters_per_epoch - 1)) if cfg.warmup_iters > 0 else 0

    def decay(it: int) -> float:
        total = (epochs() if epochs is not None else cfg.epochs) * iters_per_epoch
        epoch = it // iters_per_epoch
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** (epoch // cfg.lr_step_size)
        if cfg.lr_schedule == "multistep":
            return cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
        return 1.0  # constant

    def factor(it: int) -> float:
        return warmup_ramp(it, warmup, cfg.warmup_factor) * decay(it)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_ramp(it: int, warmup_iters: int, start_factor: float) -> float:
    """The linear warm-up of torchvision's references: ``start_factor`` at iteration 0 rising to
    1 at ``warmup_iters`` (1 throughout when there is no warm-up)."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return start_factor * (1 - alpha) + alpha
