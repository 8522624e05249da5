"""A training job for torchrun tests that need a deterministic event: a SIGTERM sent by rank 0 to
itself after a given global step, a NaN loss on one rank at one step, or a virtual clock (steps
1 s, evaluations 1 s per image) on which one rank's steps of one epoch are slower.

    torchrun --nproc_per_node 2 tests/jobs/train_job.py '{"config": {...}, "signal_at": 3}'
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from detfit import distributed
from detfit.config import TrainConfig
from detfit.engine import Callback, Trainer
from detfit.errors import Interrupted


class SignalAt(Callback):
    """Rank 0 sends itself SIGTERM after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, result):
        if trainer.global_step == self.step and distributed.is_main():
            os.kill(os.getpid(), signal.SIGTERM)


class NanAt(Callback):
    """On rank ``rank``, the RPN's losses are NaN at global step ``step`` (counted from 1)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_start(self, trainer):
        if distributed.rank() != self.rank:
            return
        rpn = trainer.module.rpn
        forward = rpn.forward

        def poisoned(*args, **kwargs):
            boxes, losses = forward(*args, **kwargs)
            if trainer.global_step + 1 == self.step and rpn.training:
                losses = {k: v * torch.tensor(float("nan")) for k, v in losses.items()}
            return boxes, losses

        rpn.forward = poisoned


class VirtualClock(Callback):
    """The trainer's clock: 1 s per step (plus ``slow`` on rank ``rank`` in epoch ``epoch``)
    and 1 s per evaluated image (:class:`VirtualTimeTrainer`), so a time budget's decisions are
    exact numbers."""

    def __init__(self, rank: int, epoch: int, slow: float) -> None:
        self.rank, self.epoch, self.slow, self.now = rank, epoch, slow, 0.0

    def __call__(self) -> float:
        return self.now

    def on_step_end(self, trainer, result):
        slow = distributed.rank() == self.rank and trainer.epoch == self.epoch
        self.now += 1.0 + (self.slow if slow else 0.0)


class VirtualTimeTrainer(Trainer):
    """A Trainer on a virtual clock (anything with a ``now`` in seconds), whose evaluations
    (every epoch's and the budget's probe, both through :meth:`Trainer.evaluate`) take 1 s per
    image they score."""

    def __init__(self, clock, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock

    def evaluate(self, loader):
        batches = list(loader)
        self.clock.now += sum(len(images) for images, _ in batches)
        return super().evaluate(batches)


def main() -> None:
    job = json.loads(sys.argv[1])
    callbacks = []
    if job.get("signal_at"):
        callbacks.append(SignalAt(job["signal_at"]))
    if job.get("nan_at"):
        callbacks.append(NanAt(*job["nan_at"]))
    clock = VirtualClock(*job["slow_rank_epoch_by"]) if job.get("slow_rank_epoch_by") else None
    if clock is not None:
        callbacks.append(clock)
    cfg = TrainConfig.from_dict(job["config"])
    try:
        if clock is not None:
            trainer = VirtualTimeTrainer(clock, cfg, callbacks=callbacks, progress=False)
        else:
            trainer = Trainer(cfg, callbacks=callbacks, progress=False)
        trainer.fit()
    except Interrupted as exc:
        if distributed.env_is_main():
            print(f"detfit: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
