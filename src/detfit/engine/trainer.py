"""The main job: train with a COCO evaluation after every epoch, writing a run folder.

runs/<name>/  config.yaml  metrics.csv  metrics.json  last.pt  best.pt  results.png
              pr_curve_{bbox,segm}.png  confusion_matrix.png  val_predictions.jpg  [tensorboard/]

:class:`Trainer` owns the loop and the run's state; which folder it writes and the run it
continues there are :mod:`detfit.engine.run_folder`'s, the time budget's plans
:mod:`detfit.engine.budget`'s, the model options taken from the data
:mod:`detfit.models.policy`'s; everything else it does (checkpoints,
metrics files, EMA, progress, console lines, and whatever a user adds) is a callback
(:mod:`detfit.engine.callbacks`). One process or many (torchrun) run the same code: the facts
about ranks live in :mod:`detfit.distributed`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from detfit import distributed
from detfit.checkpoint import (
    ResumeState,
    best_payload,
    model_info,
    save_checkpoint,
)
from detfit.config import TrainConfig
from detfit.data.loaders import build_datasets, build_loaders
from detfit.data.spec import absolute_spec
from detfit.engine.budget import BudgetPlanner, TimeBudget
from detfit.engine.builders import build_optimizer, build_scheduler, effective_lr
from detfit.engine.callbacks import (
    EMA,
    Callback,
    Checkpointer,
    ConsoleLog,
    MetricsWriter,
    Patience,
    Plots,
    ProgressBar,
    ValidationLoss,
    write_metrics,
)
from detfit.engine.interrupt import StopRequest
from detfit.engine.rng import rng_state, seed_everything, set_rng_state
from detfit.engine.run_folder import RunFolder, resume_command
from detfit.engine.step import LossMeter, StepResult, TrainStep
from detfit.errors import DetfitError, Interrupted
from detfit.eval.assembly import evaluate_run, prepare_model
from detfit.eval.loop import EvaluationResult
from detfit.memory import check_resize_fits
from detfit.models import (
    build_model,
    iou_types,
)
from detfit.models.policy import (
    adapt_anchors_to_data,
    adapt_to_data,
    loss_weights_for,
    options_for_data,
)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20


def flatten_metrics(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{iou}_{name}": value for iou, s in stats.items() for name, value in s.items()}


def flatten_per_class(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    """``bbox_AP/<class>``: per-class AP (IoU 0.50:0.95), -1 where a class has no ground truth."""
    return {f"{iou}_AP/{name}": ap for iou, aps in per_class.items() for name, ap in aps.items()}


def best_metric_key(cfg: TrainConfig) -> str:
    """The metrics column that picks best.pt and that patience watches: ``best_metric``, else
    segm_AP for a mask model and bbox_AP otherwise. One the model is not scored on is refused."""
    scored = iou_types(cfg.model)
    key = cfg.best_metric or ("segm_AP" if "segm" in scored else "bbox_AP")
    if key.split("_")[0] not in scored:
        raise DetfitError(f"best_metric={key}: {cfg.model} is scored on {', '.join(scored)} only")
    return key


class Trainer:
    """Fine-tune ``cfg`` (or continue the run in ``resume``), evaluating after every epoch.

    ``Trainer(cfg, callbacks=[...]).fit()`` returns the run folder. Under torchrun every rank
    runs it: DistributedDataParallel, a shard of the data per rank, the evaluation gathered to
    rank 0, files written by rank 0. SIGTERM or Ctrl-C stops after the current step with a
    checkpoint and raises :class:`~detfit.errors.Interrupted`, whose message says how to resume.

    ``overrides`` (with ``resume``) change the settings in :data:`RESUMABLE`, e.g. ``epochs`` to
    extend a finished run; ``overwrite`` starts over in an ``out`` folder that holds a run.
    """

    def __init__(
        self,
        cfg: TrainConfig | None = None,
        *,
        callbacks: Sequence[Callback] = (),
        resume: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        overwrite: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        if (cfg is None) == (resume is None):
            raise ValueError("give either cfg or resume")
        self.cfg = cfg  # the settings it trains with: a resumed run's own once fit() reads them
        self.folder = RunFolder(
            cfg, Path(resume) if resume is not None else None, dict(overrides or {}), overwrite, log
        )
        self.progress = progress
        self.user_callbacks = list(callbacks)
        self._log = log
        # the run's state, public for callbacks
        self.checkpoint: ResumeState | None = None  # what a resume started from
        self.epoch = 0  # index of the current epoch (shown as epoch + 1 everywhere)
        self.iteration = 0  # batches trained in the current epoch
        self.evaluated = False  # the current epoch's evaluation and metrics row are done
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.meter = LossMeter()
        self.should_stop = False
        self.finished = False  # an elastic restart found the run already complete
        self.last_evaluation: EvaluationResult | None = None
        # columns callbacks add to the epoch's metrics row during on_evaluation (val_loss, ...)
        self.extra_metrics: dict[str, float] = {}
        self.seconds_before = 0.0  # training time before a resume
        self.planner: BudgetPlanner | None = None  # the time_budget's (detfit.engine.budget)
        self.stop_reason: str | None = None  # why the run ended before its last epoch
        self.clock: Callable[[], float] = time.perf_counter  # what minutes and budgets count

    # ---- public helpers for callbacks -------------------------------------------------------
    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if distributed.is_main():
            self._log(message)

    def epoch_label(self) -> str:
        """``epoch 3/10``: how every line, bar and resume message counts epochs (from 1)."""
        return f"epoch {self.epoch + 1}/{self.planned_epochs}"

    @property
    def planned_epochs(self) -> int:
        """The epochs this run trains: ``epochs``, or fewer where the time budget plans so."""
        return self.budget.planned if self.budget is not None else self.cfg.epochs

    @property
    def budget(self) -> TimeBudget | None:
        """The time budget's plan (:class:`~detfit.engine.budget.TimeBudget`), None without."""
        return self.planner.budget if self.planner is not None else None

    @property
    def minutes(self) -> float:
        return (self.seconds_before + self.clock() - self._t0) / 60

    def save_checkpoint(self, name: str, resumable: bool = True) -> Path:
        """Write ``run_dir/name`` with everything needed to continue from this very step (every
        rank's RNG state included: call it on every rank), or with ``resumable=False`` only what
        prediction and export need (no optimizer state). Returns the path."""
        rngs = distributed.gather_to_main(rng_state())
        path = self.run_dir / name
        if distributed.is_main():
            state = self._state(rngs)
            save_checkpoint(path, state.payload() if resumable else best_payload(state))
        distributed.barrier()
        self._fire("on_checkpoint", path)
        return path

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to the last epoch (or until stopped); returns the run folder."""
        self.cfg = self.folder.settings()
        self.device = distributed.resolve_device(self.cfg.device)
        with distributed.process_group(self.device), StopRequest() as stop:
            self.stop = stop
            try:
                self._setup()
                if not self.finished:
                    self._fire("on_train_start")
                    self._train()
                    self._fire("on_train_end")
            finally:
                # drop every reference to the DDP wrapper before the group goes (see shutdown)
                self.model = self.step = None
                self.folder.release()
        return self.run_dir

    def _setup(self) -> None:
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        chosen = self.folder.choose()  # a restart may continue its run, with that run's settings
        self.run_dir, self.cfg = chosen.run_dir, chosen.cfg
        self.checkpoint, self.finished = chosen.checkpoint, chosen.finished
        if self.finished:  # the kill may have come before the metrics files were rewritten
            if distributed.is_main():
                write_metrics(self.run_dir, self.checkpoint.history)
            return
        cfg = self.cfg
        cfg.out = str(self.run_dir)
        if self.checkpoint is None:  # a new run: its id goes into config.yaml and checkpoints
            cfg.run_id = distributed.broadcast_from_main(uuid.uuid4().hex[:16])
        cfg.world_size, cfg.global_batch_size = self.world_size, self.world_size * cfg.batch_size
        seed_everything(cfg.seed)  # the same initial weights on every rank
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        check_resize_fits(cfg.model_options, cfg.batch_size, cfg.eval_batch_size)
        with distributed.main_first():  # rank 0 downloads Penn-Fudan if needed
            self.data = build_datasets(cfg, log=self.log)
        self.module, self.info = self._build_model()
        if "segm" in iou_types(cfg.model) and not self.data.has_masks:
            raise DetfitError(
                f"{cfg.dataset}: not every object has a mask, so {cfg.model} cannot train on it; "
                "choose a detection model (detfit models)"
            )
        self.module.to(self.device)
        # the speed-ups and precision detfit eval applies too: the run scores as eval does
        self.autocast_dtype = prepare_model(self.module, cfg, self.device, self.log)
        if cfg.sync_bn and self.world_size > 1:
            if self.device.type != "cuda":
                raise DetfitError(
                    "sync_bn: torch's SyncBatchNorm runs on CUDA only; train without it on "
                    f"{self.device.type}"
                )
            self.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        self.eval_model = self.module
        self.loaders = build_loaders(cfg, self.data, self.rank, self.world_size)
        lr = effective_lr(cfg, self.world_size)
        self.optimizer = build_optimizer(cfg, self.module, lr)
        batches = self.loaders.batches.batches_per_epoch()
        self.iters_per_epoch = min(batches, cfg.max_iters_per_epoch or batches)
        self.planner = BudgetPlanner.for_run(self, self.checkpoint)
        self.scheduler = build_scheduler(
            cfg, self.optimizer, self.iters_per_epoch, epochs=lambda: self.planned_epochs
        )
        # float16 needs loss scaling; bfloat16 has float32's range and does not
        use_scaler = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        self.metric_key = best_metric_key(cfg)
        self.model = distributed.wrap(self.module, self.device)
        self.step = TrainStep(
            self.model,
            self.optimizer,
            self.device,
            scaler=self.scaler,
            clip_grad_norm=cfg.clip_grad_norm,
            loss_weights=loss_weights_for(cfg, self.log),
            lr_scheduler=self.scheduler,
            autocast_dtype=self.autocast_dtype,
        )
        self.callbacks = self._default_callbacks() + self.user_callbacks
        seed_everything(cfg.seed + 1000 * self.rank)  # each rank its own random stream
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        else:  # the run records where its data is from anywhere: eval RUN works from any folder
            cfg.dataset = absolute_spec(cfg.dataset)
            cfg.data_root = os.path.abspath(cfg.data_root) if cfg.data_root else None
        if distributed.is_main():  # only now, with data and model checked: a folder is made
            self.folder.start_writing(cfg)
        distributed.barrier()
        if self.world_size > 1:
            self.log(
                f"torchrun: {self.world_size} processes x batch {cfg.batch_size} = global batch "
                f"{cfg.global_batch_size}; lr {lr:g} (lr_scaling {cfg.lr_scaling}"
                + (f": {cfg.lr:g} x {self.world_size})" if cfg.lr_scaling == "linear" else ")")
            )
        self._t0 = self.clock()

    def _build_model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        cfg, ckpt = self.cfg, self.checkpoint
        if ckpt is not None:
            return ckpt.training_model(f"{self.run_dir}/last.pt"), ckpt.model_info
        adapt_to_data(cfg, self.data, self.log)
        options = options_for_data(cfg, self.data, self.log)
        model = build_model(
            cfg.model,
            len(self.data.classes),
            weights=cfg.weights,
            weights_backbone=cfg.weights_backbone,
            **options,
        )
        adapt_anchors_to_data(cfg, self.data, model, options, self.log)
        info = model_info(cfg.model, len(self.data.classes), self.data.classes, options, model)
        info["category_ids"] = self.data.category_ids
        info["keypoint_names"] = self.data.keypoint_names  # test-time flips swap left and right
        return model, info

    def _default_callbacks(self) -> list[Callback]:
        cfg = self.cfg
        callbacks: list[Callback] = [EMA(cfg.ema_decay)] if cfg.ema_decay else []
        if cfg.val_loss:
            callbacks.append(ValidationLoss())
        if cfg.patience:  # before the checkpoint, which records why the run stops
            callbacks.append(Patience(cfg.patience))
        # the checkpoint before the metrics files: they never list an epoch last.pt lacks
        callbacks += [Checkpointer(cfg.checkpoint_every_iters), MetricsWriter(), ConsoleLog()]
        if cfg.plots:
            callbacks.append(Plots())
        if "tensorboard" in cfg.loggers():
            from detfit.engine.tensorboard import TensorBoardLogger

            callbacks.append(TensorBoardLogger())
        if "mlflow" in cfg.loggers():
            from detfit.engine.mlflow_logger import MLflowLogger

            callbacks.append(MLflowLogger())
        if self.progress:
            callbacks.append(ProgressBar(cfg.print_freq))
        return callbacks

    def _state(self, rngs: list[dict[str, Any]] | None) -> ResumeState:
        return ResumeState(
            model=self.eval_model.state_dict(),
            model_info=self.info,
            config=self.cfg.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            history=self.history,
            epoch=self.epoch,
            iteration=self.iteration,
            evaluated=self.evaluated,
            global_step=self.global_step,
            iters_per_epoch=self.iters_per_epoch,
            world_size=self.world_size,
            seconds=self.minutes * 60,
            metric_key=self.metric_key,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng=rngs,
            meter=self.meter.state_dict(),
            callbacks={type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            budget=self.budget.state_dict() if self.budget is not None else None,
            stopped=self.stop_reason,
            train_model=self.module.state_dict() if self.eval_model is not self.module else None,
        )

    def _restore(self, state: ResumeState) -> None:
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.history = list(state.history)
        self.epoch, self.iteration = state.epoch, state.iteration
        self.evaluated, self.global_step = state.evaluated, state.global_step
        self.seconds_before = state.seconds
        if state.meter and not self.evaluated:
            self.meter = LossMeter.from_state(state.meter)
        for cb in self.callbacks:
            cb.load_state_dict(state.callbacks.get(type(cb).__name__, {}))
        rngs, saved_world = state.rng, state.world_size
        if saved_world != self.world_size and not self.evaluated:
            # another number of processes: the epoch's position in samples, roughly kept
            self.iteration = self.iteration * saved_world // self.world_size
            self.log(
                f"resuming with {self.world_size} processes instead of {saved_world}: epoch "
                f"{self.epoch + 1} continues at iteration {self.iteration}, with new random streams"
            )
        elif rngs and self.rank < len(rngs):
            set_rng_state(rngs[self.rank])
        where = (
            f"after epoch {self.epoch + 1}"
            if self.evaluated
            else f"at {self.epoch_label()}, iteration {self.iteration}/{self.iters_per_epoch}"
        )
        self.log(f"resuming {self.run_dir} {where} (of {self.cfg.epochs} epochs)")

    def _fire(self, event: str, *args: Any) -> None:
        main = distributed.is_main()
        for cb in self.callbacks:
            if main or not cb.main_process_only:
                getattr(cb, event)(self, *args)

    def _train(self) -> None:
        epoch = self.epoch + 1 if self.evaluated else self.epoch
        if self.planner is not None:
            self.planner.start()
        while epoch < self.planned_epochs:
            if epoch != self.epoch or self.evaluated:
                self.epoch, self.iteration, self.evaluated = epoch, 0, False
                self.meter = LossMeter()
            began, began_at = self.clock(), self.iteration
            self._fire("on_epoch_start")
            if self.iteration < self.iters_per_epoch:
                self._train_epoch()
            self.meter.stop()
            evaluating = self.clock()
            result = self.evaluate(self.loaders.test)
            if self.budget is not None:
                self.budget.eval_seconds = self.clock() - evaluating
            self.last_evaluation = result
            self.extra_metrics = {}
            self._fire("on_evaluation", result)
            row = self._metrics_row(result)
            self.history.append(row)
            self.evaluated = True
            self._fire("on_epoch_end", row)
            if distributed.any_rank(self.stop.requested):
                self._interrupt()
            if distributed.any_rank(self.should_stop) or self.stop_reason:
                reason = self.stop_reason or "a callback asked to"
                self.log(f"stopping after {self.epoch_label()}: {reason}")
                break
            if self.planner is not None:
                self.planner.after_epoch(began if began_at == 0 else None)
            epoch += 1
        else:
            if self.planner is not None:
                self.planner.finished()

    def evaluate(self, loader: Any) -> EvaluationResult:
        """Score the evaluated model (EMA's when on) on ``loader``, as every epoch does."""
        return evaluate_run(
            self.eval_model,
            loader,
            self.cfg,
            self.device,
            classes=self.data.classes,
            keypoint_names=self.data.keypoint_names,
            autocast_dtype=self.autocast_dtype,
            progress=self.progress,
        )

    def _train_epoch(self) -> None:
        self.loaders.set_epoch(self.epoch, skip=self.iteration)
        self.meter.start = time.perf_counter()
        for images, targets in self.loaders.train:
            if self.iteration >= self.iters_per_epoch:
                break
            where = f"{self.epoch_label()}, iteration {self.iteration + 1}"
            stepping = self.clock()
            result: StepResult = self.step(images, targets, stop=self.stop.requested, where=where)
            self.iteration += 1
            self.global_step += 1
            self.meter.add(result)
            self._fire("on_step_end", result)
            if result.stop:
                self._interrupt()
            if self.planner is not None and self.planner.out_of_time(self.clock() - stepping):
                break

    def _metrics_row(self, result: EvaluationResult) -> dict[str, Any]:
        train = self.meter.summary(self.optimizer.param_groups[0]["lr"])
        return {
            "epoch": self.epoch + 1,
            "minutes": round(self.minutes, 3),
            **{f"train_{k}": v for k, v in train.items()},
            **self.extra_metrics,
            "eval_seconds": result.seconds,
            "eval_seconds_per_image": result.seconds / max(result.num_images, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "world_size": self.world_size,
            "global_batch_size": self.cfg.global_batch_size,
            **flatten_metrics(result.stats),
            **flatten_per_class(result.per_class),
        }

    def _interrupt(self) -> None:
        reason = self.stop.name or "a stop request"
        self._fire("on_interrupt", reason)
        where = (
            f"after {self.epoch_label()}"
            if self.evaluated
            else f"at {self.epoch_label()}, iteration {self.iteration}/{self.iters_per_epoch}"
        )
        code = 128 + (self.stop.signum or 2)
        raise Interrupted(
            f"stopped by {reason} {where}; {self.run_dir / 'last.pt'} holds it; resume with: "
            f"{resume_command(self.run_dir)}",
            exit_code=code,
        )


def fit(
    cfg: TrainConfig | None = None,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """``Trainer(cfg, ...).fit()``: train ``cfg`` (or continue ``resume``); returns the run folder."""
    return Trainer(cfg, resume=resume, progress=progress, log=log, callbacks=callbacks).fit()
