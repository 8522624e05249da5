"""A wall-clock budget for a run (``time_budget``): how many epochs fit, and when to stop.

What a user has is minutes, not epochs: the same epochs take twice as long on another machine.
The plan is made from this machine's own times: the first iterations (``PROBE_ITERS``, the very
first left out: it pays for allocations) and an evaluation of a few held-out batches, scaled to
the whole split. It is made again after every epoch from the epoch's real cost (training,
evaluation, checkpoints), so a machine that slows down gets fewer epochs; within an epoch the
run stops early, leaving time for the evaluation, when even that epoch no longer fits. The
learning-rate schedule is stretched to the planned end (the trainer's scheduler reads
:attr:`TimeBudget.planned`). Every rank takes rank 0's plan and stop decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from detfit.config import parse_duration

PROBE_ITERS = 10  # iterations timed before the first plan (fewer when an epoch is shorter)
PROBE_EVAL_BATCHES = 2  # held-out batches evaluated to time an evaluation
MARGIN = 1.1  # planned cost per epoch x this: checkpoints, plots and noise must fit too


def format_duration(seconds: float) -> str:
    """``42 s``, ``7.5 min``, ``1.25 h``: how plans and stops are logged."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


@dataclass
class TimeBudget:
    """The plan for a budget of ``seconds``, at most ``cap`` epochs (the ``epochs`` setting).

    ``seconds_per_iter`` and ``eval_seconds`` are what was measured; ``planned`` is the number of
    epochs the run trains (and its schedule ends at); ``stopped`` says why it ended early.
    The state rides in checkpoints, so a resumed run keeps its plan and counts the time spent.
    """

    seconds: float
    cap: int
    planned: int
    seconds_per_iter: float | None = None
    eval_seconds: float | None = None
    stopped: str | None = None

    @classmethod
    def from_setting(cls, text: str, cap: int) -> TimeBudget:
        return cls(parse_duration(text), cap, planned=cap)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TimeBudget:
        return cls(**state)

    @property
    def measured(self) -> bool:
        return self.seconds_per_iter is not None and self.eval_seconds is not None

    def plan(self, spent: float, done: int, finish_current: float, epoch_cost: float) -> str:
        """Set :attr:`planned`: ``spent`` seconds into the run, ``done`` epochs trained once the
        current one is (``finish_current`` seconds away, its evaluation included), an epoch
        costing ``epoch_cost`` seconds. Returns the reason, in words."""
        remaining = self.seconds - spent - finish_current
        more = max(math.floor(remaining / (epoch_cost * MARGIN)), 0) if epoch_cost > 0 else 0
        fits = done + more
        self.planned = max(min(self.cap, fits), done, 1)
        why = (
            f"{format_duration(max(self.seconds - spent, 0.0))} left, "
            f"{format_duration(epoch_cost)} per epoch"
        )
        if fits > self.cap:
            return f"{why}: {fits} epochs would fit, the epochs setting caps it at {self.cap}"
        return why

    def must_stop_now(self, spent: float) -> bool:
        """Whether, ``spent`` seconds in (the next step counted), only the evaluation still
        fits."""
        return spent + (self.eval_seconds or 0.0) * MARGIN >= self.seconds
