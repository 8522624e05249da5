"""One training step (:class:`TrainStep`) and its running loss means (:class:`LossMeter`), and
``train_one_epoch``/``evaluate`` with the signatures of torchvision's references, so the
tutorial's main runs unchanged. The :class:`~detfit.engine.trainer.Trainer` runs the same step and
meter; evaluation lives in :mod:`detfit.eval`."""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from detfit import distributed
from detfit.engine.builders import warmup_ramp
from detfit.errors import DetfitError
from detfit.eval.loop import EvaluationResult, as_float_image, evaluate

__all__ = [
    "EvaluationResult",
    "LossMeter",
    "StepResult",
    "TrainStep",
    "evaluate",
    "train_one_epoch",
]

MAX_NONFINITE_STEPS = 5  # consecutive NaN/inf losses before training stops
# What LossMeter.summary reports beside the mean of each loss (metrics rows: train_<name>).
NOT_LOSSES = ("lr", "seconds", "seconds_per_iter", "skipped_steps")


def move_to(images, targets, device: torch.device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in t.items()
        }
        for t in targets
    ]
    return images, targets


def reference_warmup(optimizer, data_loader) -> torch.optim.lr_scheduler.LRScheduler:
    """The references' first-epoch warm-up: linear from 0.001x over min(1000, len-1) iterations."""
    warmup_iters = max(1, min(1000, len(data_loader) - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: warmup_ramp(it, warmup_iters, 0.001)
    )


@dataclass
class StepResult:
    """What one step did, the same on every rank."""

    losses: dict[str, float]  # each loss (unweighted), mean over ranks; empty when skipped
    loss: float  # the weighted sum that was minimised, mean over ranks
    skipped: bool  # a non-finite loss on some rank: no update on any rank
    stop: bool  # a stop (SIGTERM, Ctrl-C) was requested on some rank


class TrainStep:
    """One optimisation step: forward, weighted loss, one cross-rank reduction, backward, clip,
    optimizer and per-iteration schedule.

    The reduction carries the losses (reported as the mean over ranks) and the stop flag, so
    every rank takes the same decisions without another collective: a non-finite loss on any
    rank skips the step on every rank (never a hang in DDP), several in a row stop training with
    a message, and a stop requested on any rank ends the run on every rank after this step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device | str,
        *,
        scaler: torch.amp.GradScaler | None = None,
        clip_grad_norm: float | None = None,
        loss_weights: dict[str, float] | None = None,
        lr_scheduler: Any = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        self.loss_weights = loss_weights or {}
        self.lr_scheduler = lr_scheduler
        # bf16/fp16 autocast (models.precision); a scaler alone means the device's default, as
        # with the references' --amp
        self.autocast_dtype = autocast_dtype
        self.nonfinite = 0  # consecutive non-finite losses

    def __call__(
        self, images: Sequence, targets: Sequence, *, stop: bool = False, where: str = ""
    ) -> StepResult:
        self.model.train()
        images, targets = move_to([as_float_image(im) for im in images], targets, self.device)
        enabled = self.autocast_dtype is not None or self.scaler is not None
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled):
            loss_dict = self.model(images, targets)
            unknown = set(self.loss_weights) - set(loss_dict)
            if unknown:
                raise DetfitError(
                    f"loss_weights: {', '.join(sorted(unknown))} not among this model's losses "
                    f"({', '.join(loss_dict)})"
                )
            loss = sum(v * self.loss_weights.get(k, 1.0) for k, v in loss_dict.items())
        reported = [v.detach().float() for v in loss_dict.values()]
        reported += [loss.detach().float(), torch.tensor(float(stop), device=loss.device)]
        packed = torch.stack(reported).to(distributed.collective_device())
        mean = (distributed.all_reduce_sum(packed) / distributed.world_size()).tolist()
        total, stop = mean[-2], mean[-1] > 0
        if not math.isfinite(total):
            self.nonfinite += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.nonfinite >= MAX_NONFINITE_STEPS:
                raise DetfitError(
                    f"loss is {total} for {self.nonfinite} iterations in a row ({where}): "
                    "lower the learning rate or set clip_grad_norm"
                )
            self._step_schedule()  # keep the per-iteration schedule on the clock
            return StepResult({}, total, skipped=True, stop=stop)
        self.nonfinite = 0
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            self.optimizer.step()
        self._step_schedule()
        return StepResult(dict(zip(loss_dict, mean[:-2])), total, skipped=False, stop=stop)

    def _step_schedule(self) -> None:
        """Advance the per-iteration schedule even when no optimizer step was taken.

        A skipped step (non-finite loss, or AMP's GradScaler after an overflow, typically on the
        first steps) makes torch warn that the scheduler ran first; here that is intended.
        """
        if self.lr_scheduler is None:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
            self.lr_scheduler.step()


@dataclass
class LossMeter:
    """Running means of an epoch's losses; its state rides in mid-epoch checkpoints so that a
    resumed epoch reports what the uninterrupted one would."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    total: float = 0.0
    steps: int = 0
    skipped: int = 0
    seconds_before: float = 0.0  # time spent in this epoch before a resume
    start: float = field(default_factory=time.perf_counter)
    end: float | None = None  # set by stop(): the epoch's evaluation is not training time

    def add(self, result: StepResult) -> None:
        if result.skipped:
            self.skipped += 1
            return
        self.steps += 1
        self.total += result.loss
        for k, v in result.losses.items():
            self.sums[k] += v

    @property
    def mean_loss(self) -> float:
        return self.total / max(self.steps, 1)

    def stop(self) -> None:
        """The epoch's training is over: later time (evaluation, checkpoints) is not counted."""
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        end = time.perf_counter() if self.end is None else self.end
        return self.seconds_before + end - self.start

    def summary(self, lr: float) -> dict[str, float]:
        """Mean of each loss, the lr, seconds and seconds per iteration, skipped steps."""
        result = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        result.update(
            loss=self.mean_loss,
            lr=lr,
            seconds=self.seconds,
            seconds_per_iter=self.seconds / max(self.steps + self.skipped, 1),
            skipped_steps=float(self.skipped),
        )
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": dict(self.sums),
            "total": self.total,
            "steps": self.steps,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LossMeter:
        meter = cls(total=state["total"], steps=state["steps"], skipped=state["skipped"])
        meter.sums.update(state["sums"])
        meter.seconds_before = state["seconds"]
        return meter


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Iterable,
    device: torch.device | str,
    epoch: int,
    print_freq: int = 10,
    scaler: torch.amp.GradScaler | None = None,
    *,
    lr_scheduler: Any = "reference",
    clip_grad_norm: float | None = None,
    max_iters: int | None = None,
    progress: bool = True,
    ema: Any = None,
    loss_weights: dict[str, float] | None = None,
) -> dict[str, float]:
    """One pass over ``data_loader``; returns the mean of each loss and seconds per iteration.

    ``lr_scheduler`` is stepped every iteration. The default, ``"reference"``, reproduces the
    references: a linear warm-up during epoch 0 only. ``max_iters`` cuts the epoch short (smoke
    runs). ``ema`` (an ``AveragedModel``) is updated after every step. Non-finite losses skip
    the step; several in a row stop training with a message instead of training on NaN.
    ``loss_weights`` scales named losses (e.g. ``{"loss_mask": 2.0}``); the others count once.
    """
    if lr_scheduler == "reference":
        lr_scheduler = reference_warmup(optimizer, data_loader) if epoch == 0 else None
    step = TrainStep(
        model,
        optimizer,
        device,
        scaler=scaler,
        clip_grad_norm=clip_grad_norm,
        loss_weights=loss_weights,
        lr_scheduler=lr_scheduler,
    )
    meter = LossMeter()
    every = max(1, print_freq // 5)
    bar = tqdm(
        data_loader,
        desc=f"epoch {epoch + 1}",
        disable=not progress or not distributed.is_main(),
        dynamic_ncols=True,
        miniters=every,
    )
    for i, (images, targets) in enumerate(bar):
        if max_iters is not None and i >= max_iters:
            break
        result = step(images, targets, where=f"epoch {epoch + 1}, iteration {i + 1}")
        meter.add(result)
        if ema is not None and not result.skipped:
            ema.update_parameters(distributed.unwrap(model))
        if i % every == 0:
            bar.set_postfix(
                loss=f"{meter.mean_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}"
            )
    bar.close()
    return meter.summary(optimizer.param_groups[0]["lr"])
