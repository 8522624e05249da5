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

import itertools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from detfit import distributed
from detfit.config import parse_duration

if TYPE_CHECKING:
    from detfit.checkpoint import ResumeState
    from detfit.engine.trainer import Trainer

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


class BudgetPlanner:
    """The trainer's side of a time budget: it times the probe, makes the plans and decides when
    an epoch must end, reading the trainer's clock, position and loaders. Every number that
    decides is rank 0's, broadcast, so every rank stops at the same step."""

    probe_iters = PROBE_ITERS  # iterations timed before the first plan (a test may shorten it)

    def __init__(self, trainer: Trainer, budget: TimeBudget) -> None:
        self.trainer, self.budget = trainer, budget
        self._probe_from: tuple[float, int] | None = None  # (time, iteration) the probe began
        self._planned = False  # the plan's first line is written

    @classmethod
    def for_run(cls, trainer: Trainer, checkpoint: ResumeState | None) -> BudgetPlanner | None:
        """The run's planner: a new budget, or the checkpoint's plan (a new cap when ``epochs``
        changed on resume, a new plan from the last epoch's cost when the budget did); None
        without ``time_budget``."""
        cfg = trainer.cfg
        if not cfg.time_budget:
            return None
        fresh = TimeBudget.from_setting(cfg.time_budget, cfg.epochs)
        if checkpoint is None or not checkpoint.budget:
            return cls(trainer, fresh)
        budget = TimeBudget.from_state(checkpoint.budget)
        budget.seconds, budget.cap = fresh.seconds, cfg.epochs
        done = checkpoint.done
        budget.planned = min(max(budget.planned, done), cfg.epochs)
        planner = cls(trainer, budget)
        if checkpoint.evaluated and budget.measured and done:
            cost = budget.seconds_per_iter * trainer.iters_per_epoch + budget.eval_seconds
            why = budget.plan(checkpoint.seconds, done, 0.0, cost)
            trainer.log(f"time budget {cfg.time_budget}: planned {budget.planned} epochs ({why})")
            planner._planned = True
        return planner

    def start(self) -> None:
        """Before the first epoch: say what is timed, unless the plan is already made."""
        if not self.budget.measured:
            self.trainer.log(
                f"time budget {self.trainer.cfg.time_budget}: timing the first iterations and "
                f"an evaluation to plan the epochs (at most {self.budget.cap}, the epochs "
                "setting)"
            )

    def out_of_time(self, last_step: float) -> bool:
        """After a step that took ``last_step`` seconds: time the probe and plan; whether the
        epoch must end now, another step like it and the evaluation no longer fitting (the same
        answer on every rank)."""
        trainer = self.trainer
        if not self.budget.measured:
            self._probe()
            return False
        if trainer.iteration >= trainer.iters_per_epoch:
            return False  # the evaluation comes next anyway
        late = self.budget.must_stop_now(trainer.minutes * 60 + last_step)
        if distributed.any_rank(late):
            trainer.stop_reason = (
                f"the time budget ({trainer.cfg.time_budget}) leaves only the time to evaluate, "
                f"at iteration {trainer.iteration}/{trainer.iters_per_epoch}"
            )
            return True
        return False

    def _probe(self) -> None:
        """Time the run's iterations after its first (which pays for allocations), up to
        :attr:`probe_iters`, then an evaluation of a few held-out batches, scaled to the whole
        split, and make the first plan. An epoch that ends sooner times its own evaluation instead."""
        trainer, budget = self.trainer, self.budget
        now = trainer.clock()
        if self._probe_from is None:
            self._probe_from = (now, trainer.iteration)
            return
        start, first = self._probe_from
        steps = trainer.iteration - first
        epoch_over = trainer.iteration >= trainer.iters_per_epoch
        if steps < self.probe_iters - 1 and not epoch_over or steps <= 0:
            return  # (an epoch of one step: the plan follows its evaluation, after_epoch)
        budget.seconds_per_iter = distributed.broadcast_from_main((now - start) / steps)
        if epoch_over:
            return  # the plan follows the epoch's evaluation (after_epoch)
        evaluating = trainer.clock()
        batches = list(itertools.islice(trainer.loaders.test, PROBE_EVAL_BATCHES))
        trainer.evaluate(batches)
        scale = len(trainer.loaders.test) / max(len(batches), 1)
        seconds = distributed.broadcast_from_main((trainer.clock() - evaluating) * scale)
        budget.eval_seconds = seconds
        iters = trainer.iters_per_epoch
        left = (iters - trainer.iteration) * budget.seconds_per_iter + seconds
        self._plan(left, budget.seconds_per_iter * iters + seconds)

    def after_epoch(self, epoch_started: float | None) -> None:
        """After an epoch: plan again from what the epoch really cost, evaluation and
        checkpoints included (estimated from the measured rates when it was resumed part way,
        ``epoch_started`` None)."""
        trainer, budget = self.trainer, self.budget
        if budget.seconds_per_iter is None and epoch_started is not None:
            # epochs too short for the probe (one step): the epoch's own times are the rates
            spent = trainer.clock() - epoch_started - (budget.eval_seconds or 0.0)
            budget.seconds_per_iter = distributed.broadcast_from_main(
                max(spent, 0.0) / max(trainer.iters_per_epoch, 1)
            )
        if budget.seconds_per_iter is None:
            return
        if epoch_started is not None:
            cost = trainer.clock() - epoch_started
        else:
            cost = budget.seconds_per_iter * trainer.iters_per_epoch + budget.eval_seconds
        self._plan(0.0, distributed.broadcast_from_main(cost))

    def finished(self) -> None:
        """After the last planned epoch: one line with the time it all took."""
        trainer = self.trainer
        trainer.log(
            f"time budget {trainer.cfg.time_budget}: {trainer.planned_epochs} epochs trained "
            f"and evaluated in {format_duration(trainer.minutes * 60)}"
        )

    def _plan(self, finish_current: float, epoch_cost: float) -> None:
        """Plan, on rank 0's numbers; the first plan is one line saying why, later changes too."""
        trainer, budget = self.trainer, self.budget
        before = budget.planned
        why = budget.plan(trainer.minutes * 60, trainer.epoch + 1, finish_current, epoch_cost)
        budget.planned = distributed.broadcast_from_main(budget.planned)
        if not self._planned:
            rate = (
                f"{budget.seconds_per_iter:.2f} s per iteration x {trainer.iters_per_epoch} + "
                f"{format_duration(budget.eval_seconds)} evaluation"
            )
            trainer.log(
                f"time budget {trainer.cfg.time_budget}: planned {budget.planned} epochs ({rate}; "
                f"{why}); the learning-rate schedule ends there"
            )
        elif budget.planned != before:
            trainer.log(f"time budget: now {budget.planned} epochs instead of {before} ({why})")
        self._planned = True
