"""Callbacks: everything the training loop does besides training.

The :class:`~detfit.engine.trainer.Trainer` calls each callback at named events, in list order,
passing itself (its attributes are the run's state: ``epoch``, ``iteration``, ``global_step``,
``history``, ``model``, ``optimizer``, ``run_dir``, ...). Writing metrics, saving checkpoints,
EMA, the progress bar and the console log are callbacks below; a user adds their own with
``Trainer(cfg, callbacks=[...])``. Events, in the order they fire:

- ``on_train_start``: the model, data and optimizer are ready (and restored when resuming);
- ``on_epoch_start``; ``on_step_end(result)`` after each optimisation step;
- ``on_evaluation(result)`` after the epoch's COCO evaluation;
- ``on_epoch_end(row)`` with the epoch's metrics row (already in ``trainer.history``);
- ``on_checkpoint(path)`` after a checkpoint file was written;
- ``on_interrupt(reason)`` when SIGTERM/Ctrl-C stops the run after a step;
- ``on_train_end``.

A callback with ``main_process_only = True`` runs on rank 0 alone (files, console). Others run on
every rank and must take the same decisions there (they see the same numbers). Setting
``trainer.should_stop = True`` ends training after the current epoch. ``state_dict`` and
``load_state_dict`` carry a callback's state through checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from detfit.engine.ema import ema_model
from detfit.fileio import atomic_write_text

if TYPE_CHECKING:
    from detfit.engine.step import StepResult
    from detfit.engine.trainer import Trainer
    from detfit.eval.loop import EvaluationResult


class Callback:
    """Base class: override the events you need."""

    main_process_only = False

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_evaluation(self, trainer: Trainer, result: EvaluationResult) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...

    def on_interrupt(self, trainer: Trainer, reason: str) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EMA(Callback):
    """Evaluate (and save as ``model``) an exponential moving average of the weights."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema = None
        self._updates = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.ema = ema_model(trainer.module, self.decay)
        if trainer.checkpoint is not None:  # resuming: its model holds the averaged weights
            self.ema.module.load_state_dict(trainer.checkpoint.model)
            self.ema.n_averaged.fill_(self._updates)
        trainer.eval_model = self.ema.module

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not result.skipped:
            self.ema.update_parameters(trainer.module)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": int(self.ema.n_averaged) if self.ema is not None else self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._updates = int(state.get("updates", 0))


class Checkpointer(Callback):
    """``last.pt`` every ``every_iters`` steps, after every epoch and on an interrupt; ``best.pt``
    (what prediction and export need, no optimizer state) whenever the epoch's metric beats
    :attr:`best`, the best so far, which the checkpoints carry. Runs on every rank (the save
    gathers every rank's RNG state); rank 0 writes."""

    def __init__(self, every_iters: int | None = None) -> None:
        self.every_iters = every_iters
        self.best = -1.0

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if (
            self.every_iters
            and trainer.global_step % self.every_iters == 0
            and trainer.iteration < trainer.iters_per_epoch  # the epoch's end saves anyway
        ):
            trainer.save_checkpoint("last.pt")

    def on_train_start(self, trainer: Trainer) -> None:
        # a resumed run whose checkpoint predates this state still knows its best epoch
        scores = [row[trainer.metric_key] for row in trainer.history if trainer.metric_key in row]
        self.best = max([self.best, *scores])

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        # best.pt before last.pt: a kill between the two must not lose the best epoch
        if row[trainer.metric_key] > self.best:
            self.best = row[trainer.metric_key]
            trainer.save_checkpoint("best.pt", resumable=False)
        trainer.save_checkpoint("last.pt")

    def on_interrupt(self, trainer: Trainer, reason: str) -> None:
        trainer.save_checkpoint("last.pt")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", -1.0))


def is_new_best(history: list[dict[str, Any]], key: str) -> bool:
    """Whether the last epoch beats every earlier one on ``key``: the epoch ``best.pt`` holds."""
    *earlier, last = history
    return last[key] > max((row[key] for row in earlier), default=-1.0)


def evaluations_since_best(history: list[dict[str, Any]], key: str) -> int:
    """Evaluations after the first one that reached the best ``key`` so far (0: the last is)."""
    values = [row[key] for row in history]
    return len(values) - 1 - values.index(max(values)) if values else 0


class Patience(Callback):
    """Stop after ``patience`` evaluations in a row that do not beat the best ``best_metric``
    (setting ``patience``). It reads the history alone, so a resumed run stops where the
    uninterrupted one would."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        key = trainer.metric_key
        since = evaluations_since_best(trainer.history, key)
        if since >= self.patience and trainer.epoch + 1 < trainer.planned_epochs:
            best = trainer.history[-1 - since]
            trainer.should_stop = True
            trainer.stop_reason = (
                f"patience {self.patience}: {key} has not beaten {best[key]:.4f} (epoch "
                f"{best['epoch']}) for {since} evaluations"
            )


class MetricsWriter(Callback):
    """``metrics.json`` and ``metrics.csv``: one row per epoch, rewritten atomically after the
    epoch's checkpoint (so they never list an epoch that ``last.pt`` lacks)."""

    main_process_only = True

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        write_metrics(trainer.run_dir, trainer.history)


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "metrics.json", json.dumps(history, indent=2))
    fields = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


class ValidationLoss(Callback):
    """``val_loss`` and ``val_<name>`` per loss in the metrics: the training losses of the
    evaluated weights (EMA's when on) on the held-out split, after each evaluation (setting
    ``val_loss``). Runs on every rank, each over its share of the images."""

    def on_evaluation(self, trainer: Trainer, result: EvaluationResult) -> None:
        from detfit.engine.validation import validation_losses

        trainer.extra_metrics.update(
            validation_losses(
                trainer.eval_model,
                trainer.loaders.test,
                trainer.device,
                trainer.step.loss_weights,
                autocast_dtype=trainer.step.autocast_dtype,
            )
        )


class Plots(Callback):
    """``results.png`` after every epoch; ``pr_curve_<type>.png``, ``confusion_matrix.png`` and
    ``val_predictions.jpg`` whenever an epoch becomes the best, so they always show the weights in
    ``best.pt`` (at the end of training too). Rank 0 alone: it holds the evaluation's COCOeval.
    The predictions drawn are the ones the evaluation scored: no model runs again."""

    main_process_only = True

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        from detfit.plots import evaluation_figures, plot_results, save_figure, write_figures

        name, model = trainer.run_dir.name, trainer.cfg.model
        title = name if model in name else f"{name} ({model})"
        figure = plot_results(trainer.history, title, best_key=trainer.metric_key)
        save_figure(figure, trainer.run_dir / "results.png")
        if is_new_best(trainer.history, trainer.metric_key):
            heading = f"{title}, epoch {row['epoch']} (best)"
            figures = evaluation_figures(
                trainer.last_evaluation, trainer.data.classes, heading, trainer.data.test
            )
            write_figures(figures, trainer.run_dir)


class ConsoleLog(Callback):
    """One line when training starts, one per epoch."""

    main_process_only = True

    def on_train_start(self, trainer: Trainer) -> None:
        data = trainer.data
        trainer.log(
            f"run folder {trainer.run_dir} | model {trainer.cfg.model} | {len(data.train)} train "
            f"/ {len(data.test)} {'val' if data.held_out == 'val' else 'test'} images | "
            f"{trainer.iters_per_epoch} iterations per epoch | "
            f"device {trainer.device}"
            + (f" x {trainer.world_size} processes" if trainer.world_size > 1 else "")
        )

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        stats = trainer.last_evaluation.stats
        aps = " ".join(f"{t} AP {s['AP']:.3f} (AP50 {s['AP50']:.3f})" for t, s in stats.items())
        trainer.log(
            f"{trainer.epoch_label()}: loss {row.get('train_loss', float('nan')):.3f} | {aps} | "
            f"{row['minutes']:.1f} min"
        )


class ProgressBar(Callback):
    """A tqdm bar per epoch, starting where a resumed epoch starts; its loss and learning rate
    are brought up to date every ``every`` iterations (the ``print_freq`` setting), and the
    epoch's last one, so that a log file gets one update per ``every`` steps, not one per step."""

    main_process_only = True

    def __init__(self, every: int = 1, file: Any = None) -> None:
        self.every = every
        self.file = file  # tqdm's default (stderr) when None
        self.bar = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(
            total=trainer.iters_per_epoch,
            initial=trainer.iteration,
            desc=trainer.epoch_label(),
            dynamic_ncols=True,
            file=self.file,
            miniters=self.every,
            mininterval=0,
        )

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.bar is None:
            return
        last = trainer.iteration >= trainer.iters_per_epoch
        if trainer.iteration % self.every == 0 or last:
            self.bar.set_postfix(
                loss=f"{trainer.meter.mean_loss:.3f}",
                lr=f"{trainer.optimizer.param_groups[0]['lr']:.2e}",
                refresh=False,
            )
        self.bar.update(1)
        if trainer.iteration >= trainer.iters_per_epoch:
            self._close()

    def on_interrupt(self, trainer: Trainer, reason: str) -> None:
        self._close()

    def on_train_end(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
