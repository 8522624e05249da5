"""The main job: train with a COCO evaluation after every epoch, writing a run folder.

runs/<name>/  config.yaml  metrics.csv  metrics.json  last.pt  best.pt  results.png
              pr_curve_{bbox,segm}.png  confusion_matrix.png  val_predictions.jpg  [tensorboard/]

:class:`Trainer` owns the loop and the run's state; everything else it does (checkpoints,
metrics files, EMA, progress, console lines, and whatever a user adds) is a callback
(:mod:`detfit.engine.callbacks`). One process or many (torchrun) run the same code: the facts
about ranks live in :mod:`detfit.distributed`.
"""

from __future__ import annotations

import itertools
import os
import random
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detfit import distributed
from detfit.config import RECIPES, SPEED_UPS_OFF, TrainConfig
from detfit.data.adapt import adapt_options
from detfit.data.spec import absolute_spec
from detfit.engine.budget import (
    PROBE_EVAL_BATCHES,
    TimeBudget,
    format_duration,
)
from detfit.engine.builders import (
    Datasets,
    build_datasets,
    build_loaders,
    build_optimizer,
    build_scheduler,
    effective_lr,
)
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
from detfit.engine.checkpoint import (
    BEST_KEYS,
    RUN_FILES,
    holds_run,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from detfit.engine.interrupt import StopRequest
from detfit.engine.loop import LossMeter, StepResult, TrainStep
from detfit.engine.runlock import RunLock
from detfit.errors import DetfitError, Interrupted, RunRefused
from detfit.eval.loop import EvaluationResult, evaluate
from detfit.fileio import remove_stale_temp_files
from detfit.memory import check_resize_fits
from detfit.models import (
    build_model,
    get_spec,
    inapplicable_options,
    iou_types,
    model_info,
    rebuild_model,
)
from detfit.models.precision import autocast_dtype, keep_fp32_where_needed
from detfit.models.speedups import speed_up
from detfit.models.tta import tta_views
from detfit.paths import DEFAULT_RUNS_DIR

# Settings that may change when a run is resumed; any other change is refused.
RESUMABLE = (
    "epochs",
    "workers",
    "device",
    "threads",
    "print_freq",
    "checkpoint_every_iters",
    "data_root",
    "eval_batch_size",
    "eval_backend",
    "plots",
    "logger",
    "time_budget",
    "patience",
    *SPEED_UPS_OFF,  # execution only: the function, state dict and optimizer state are the same
)


def new_run_dir(name: str, root: Path = DEFAULT_RUNS_DIR) -> Path:
    """``runs/<name>``, ``runs/<name>-2``, ... whichever is free first."""
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        if not path.exists():
            return path
    raise RuntimeError(f"no free run folder under {root}")


def _stat(path: Path | None) -> tuple[int, int] | None:
    """(mtime, size) of a checkpoint (a run folder's last.pt): whether it changed since read."""
    if path is None:
        return None
    path = path / "last.pt" if path.is_dir() else path
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# COCO's metric counts at most 100 detections per image: no cap above it changes AP.
COCO_MAX_DETECTIONS = 100


def options_for_data(
    cfg: TrainConfig, data: Datasets, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The model options, completed by what the data decides.

    - A recipe tuned for one model (the CPU recipe: a Mask R-CNN on detfit's own FPN) stays usable
      with ``--model`` set to another: the recipe's options that model has no use for are dropped,
      with one line; the same options set by the user are an error.
    - A recipe's detection cap below twice the most objects in any training image (the CPU
      recipe's 30 suits Penn-Fudan's at most 8 people) is raised to that, at most 100, with one
      line: a cap would otherwise cut recall on crowded images without a word.
    - Keypoint models get ``num_keypoints`` from the data.
    """
    options = dict(cfg.model_options)
    spec = get_spec(cfg.model)
    recipe = RECIPES.get(cfg.recipe, {}).get("model_options", {})
    unusable = inapplicable_options(cfg.model, options)
    yours = [k for k in unusable if k not in recipe or recipe[k] != options[k]]
    if yours:
        raise DetfitError(f"{cfg.model} does not take model option(s) {', '.join(yours)}")
    if unusable:
        log(f"{cfg.model} does not use the {cfg.recipe} recipe's {', '.join(unusable)}: ignored")
        options = {k: v for k, v in options.items() if k not in unusable}
    cap_key = next(
        (k for k in ("box_detections_per_img", "detections_per_img") if k in options), None
    )
    if cap_key and recipe.get(cap_key) == options[cap_key] and data.max_objects:
        needed = min(2 * data.max_objects, COCO_MAX_DETECTIONS)
        if options[cap_key] < needed:
            log(
                f"{cap_key}: the {cfg.recipe} recipe's {options[cap_key]} raised to {needed} "
                f"(a training image has {data.max_objects} objects)"
            )
            options[cap_key] = needed
    if spec.has_keypoints:
        if not data.keypoint_names:
            raise DetfitError(f"{cfg.dataset}: has no keypoints, and {cfg.model} needs them")
        options.setdefault("num_keypoints", len(data.keypoint_names))
    return options


def best_metric_key(cfg: TrainConfig) -> str:
    """The metrics column that picks best.pt and that patience watches: ``best_metric``, else
    segm_AP for a mask model and bbox_AP otherwise. One the model is not scored on is refused."""
    scored = iou_types(cfg.model)
    key = cfg.best_metric or ("segm_AP" if "segm" in scored else "bbox_AP")
    if key.split("_")[0] not in scored:
        raise DetfitError(f"best_metric={key}: {cfg.model} is scored on {', '.join(scored)} only")
    return key


def adapt_to_data(cfg: TrainConfig, data: Datasets, log: Callable[[str], None] = print) -> None:
    """Model options chosen from the training set's sizes (:mod:`detfit.data.adapt`), one line
    each, written into ``cfg`` so that config.yaml records them; the user's own values stay."""
    if data.sizes is None:
        return
    recipe = RECIPES.get(cfg.recipe, {}).get("model_options", {})
    choices = adapt_options(
        dict(cfg.model_options), recipe, data.sizes, not cfg.model.startswith("ssd")
    )
    for choice in choices:
        log(f"adapted to the data: {choice.line()}")
    if choices:
        cfg.model_options = {**cfg.model_options, **{c.key: c.value for c in choices}}


def loss_weights_for(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, float]:
    """The recipe's loss weights that apply to ``cfg.model``: a box model ignores ``loss_mask``
    (and a model without keypoints ``loss_keypoint``), with one line saying so."""
    spec = get_spec(cfg.model)
    absent = {"loss_mask": not spec.has_masks, "loss_keypoint": not spec.has_keypoints}
    dropped = [k for k in cfg.loss_weights if absent.get(k)]
    if dropped:
        log(f"{cfg.model} computes no {', '.join(dropped)}: ignoring its loss weight")
    return {k: v for k, v in cfg.loss_weights.items() if k not in dropped}


def resume_command(run_dir: Path) -> str:
    """The command that continues ``run_dir``, launched the way this process was."""
    resume = f"-m detfit train --resume {shlex.quote(str(run_dir))}"
    if distributed.world_size() == 1 and not distributed.launched_with_torchrun():
        return f"detfit train --resume {shlex.quote(str(run_dir))}"
    nodes = distributed.num_nodes()
    launch = f"torchrun --nproc_per_node {distributed.local_world_size()}"
    if nodes > 1:
        launch += f" --nnodes {nodes} --rdzv-backend c10d --rdzv-endpoint HOST:PORT"
    return f"{launch} {resume}"


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
        self.cfg = cfg
        self.resume_from = Path(resume) if resume is not None else None
        self.overrides = dict(overrides or {})
        self.overwrite = overwrite
        self.progress = progress
        self.user_callbacks = list(callbacks)
        self._log = log
        # the run's state, public for callbacks
        self.checkpoint: dict[str, Any] | None = None  # what a resume started from
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
        self.lock: RunLock | None = None  # the run folder's, held by rank 0 while it writes
        self._resumed_stat: tuple[int, int] | None = None
        self.budget: TimeBudget | None = None  # the time_budget's plan (detfit.engine.budget)
        self.stop_reason: str | None = None  # why the run ended before its last epoch
        self.clock: Callable[[], float] = time.perf_counter  # what minutes and budgets count
        self._probe_from: tuple[float, int] | None = None  # (time, iteration) the probe began
        self._planned = False  # the plan's first line is written

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
    def minutes(self) -> float:
        return (self.seconds_before + self.clock() - self._t0) / 60

    def save_checkpoint(self, name: str, resumable: bool = True) -> Path:
        """Write ``run_dir/name`` with everything needed to continue from this very step (every
        rank's RNG state included: call it on every rank), or with ``resumable=False`` only what
        prediction and export need (BEST_KEYS: no optimizer state). Returns the path."""
        rngs = distributed.gather_to_main(rng_state())
        path = self.run_dir / name
        if distributed.is_main():
            payload = self._payload(rngs)
            if not resumable:
                payload = {k: payload[k] for k in BEST_KEYS if k in payload}
            save_checkpoint(path, payload)
        distributed.barrier()
        self._fire("on_checkpoint", path)
        return path

    # ---- the run --------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to the last epoch (or until stopped); returns the run folder."""
        if self.resume_from is not None:
            self._load_resume(self.resume_from)
        assert self.cfg is not None
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
                if self.lock is not None:
                    self.lock.release()
        return self.run_dir

    def _load_resume(self, path: Path, finished_ok: bool = False) -> None:
        """Load the run to continue; with ``finished_ok`` a run that has trained all its epochs
        sets :attr:`finished` instead of being refused. A run folder with config.yaml and no
        checkpoint yet (the run died before its first one) starts over from its settings."""
        path = Path(path)
        if path.is_dir() and not (path / "last.pt").exists() and (path / "config.yaml").is_file():
            self._restart_from_scratch(path)
            return
        self._resumed_stat = _stat(path)
        ckpt = load_checkpoint(path)
        missing = [k for k in ("optimizer", "scheduler", "history", "epoch") if k not in ckpt]
        if missing:
            raise DetfitError(
                f"{path}: a weights-only checkpoint (no {', '.join(missing)}) cannot be resumed"
            )
        self.run_dir = path if path.is_dir() else path.parent
        cfg = TrainConfig.from_dict(ckpt["config"], f"{self.run_dir}/last.pt")
        self._check_same_run(cfg)
        changed = self._apply_overrides(cfg)
        done = len(ckpt.get("history", []))
        complete = cfg.epochs < done or (cfg.epochs == done and ckpt.get("evaluated", True))
        planned = (ckpt.get("budget") or {}).get("planned", cfg.epochs)
        if ckpt.get("stopped") and ckpt.get("evaluated", True):
            # a time budget or patience ended it: done, unless one of those settings changed
            complete = complete or not {"epochs", "time_budget", "patience"} & set(changed)
        elif planned == done and ckpt.get("evaluated", True) and "time_budget" not in changed:
            complete = complete or "epochs" not in changed
        if complete and finished_ok:
            self.finished = True
        elif complete:
            why = f" ({ckpt['stopped']})" if ckpt.get("stopped") else ""
            raise DetfitError(
                f"--resume {self.run_dir}: the run has already trained {done} epoch(s){why}; "
                f"give --epochs N with N > {done} (or a longer --time) to train it further"
            )
        self.cfg, self.checkpoint = cfg, ckpt

    def _check_same_run(self, cfg: TrainConfig) -> None:
        """last.pt must be the checkpoint of the run whose config.yaml is beside it: one copied
        from another run would otherwise rewrite this run's files with the other model's."""
        try:
            folder = TrainConfig.load(self.run_dir / "config.yaml")
        except (DetfitError, OSError):
            return  # no readable config.yaml: last.pt is all there is of the run
        if folder.run_id and cfg.run_id != folder.run_id:
            raise DetfitError(
                f"--resume {self.run_dir}: last.pt belongs to another run (run_id "
                f"{cfg.run_id or 'none'}, config.yaml says {folder.run_id}); it was copied from "
                "elsewhere: resume that run's own folder"
            )

    def _apply_overrides(self, cfg: TrainConfig) -> dict[str, Any]:
        """Apply the resumable overrides to ``cfg``; returns the settings that changed."""
        changed = {
            k: v
            for k, v in self.overrides.items()
            if v is not None and getattr(cfg, k, None) != v and k not in ("out",)
        }
        refused = sorted(set(changed) - set(RESUMABLE))
        if refused:
            raise DetfitError(
                f"--resume {self.run_dir}: {', '.join(refused)} cannot change when a run "
                f"continues (it can: {', '.join(RESUMABLE)}); to train with other settings "
                f"start a new run: --config {self.run_dir}/config.yaml"
            )
        for key, value in changed.items():
            setattr(cfg, key, value)
        return changed

    def _restart_from_scratch(self, run_dir: Path) -> None:
        """--resume of a run that stopped before its first checkpoint: nothing to continue, so it
        starts over in its folder with its config.yaml (a new run id), saying so."""
        self.run_dir = run_dir
        cfg = TrainConfig.load(run_dir / "config.yaml")
        self._apply_overrides(cfg)
        cfg.out, cfg.run_id = str(run_dir), None
        self.cfg, self.overwrite = cfg, True
        if distributed.env_is_main():
            self._log(
                f"{run_dir}: no checkpoint yet (the run stopped before its first one): starting "
                "it over from scratch with its config.yaml"
            )

    def _choose_run_dir(self) -> Path:
        """The run folder, decided by rank 0 (which also locks it) and the same on every rank; a
        refusal is raised on every rank with rank 0's message."""
        cfg = self.cfg
        if self.checkpoint is None and distributed.elastic_max_restarts() > 0 and not cfg.out:
            raise RunRefused(
                "torchrun --max-restarts needs --out RUN: a restarted group continues the run "
                "in that folder"
            )
        decided: tuple[str, str | None, bool] = ("", None, False)
        if distributed.is_main():
            resumed = self.checkpoint is not None
            try:
                run_dir = self._claim_run_dir()
                decided = (str(run_dir), None, not resumed and self.checkpoint is not None)
            except DetfitError as exc:  # every rank stops with rank 0's one line
                decided = ("", str(exc), False)
        run_dir, refusal, continued = distributed.broadcast_from_main(decided)
        if refusal is not None:
            raise RunRefused(refusal)
        if continued and not distributed.is_main():  # rank 0 continues its restarted run
            self._load_resume(Path(run_dir), finished_ok=True)
        return Path(run_dir)

    def _restarted_own_run(self, run_dir: Path) -> bool:
        """True in a group torchrun restarted, when ``run_dir``'s run is this launch's own."""
        return distributed.elastic_restart_count() > 0 and RunLock(run_dir).ours()

    def _lock(self, run_dir: Path) -> None:
        self.lock = self.lock or RunLock(run_dir)
        self.lock.acquire()

    def _claim_run_dir(self) -> Path:
        """Rank 0: the folder to write, locked when it exists (a new one is locked as it is made,
        in :meth:`_setup`). A restart never turns ``overwrite`` on: it continues the run only when
        this launch started it, and otherwise decides as the first attempt did."""
        cfg = self.cfg
        if self.checkpoint is not None:  # --resume
            self._lock(self.run_dir)
            if self._resumed_stat != _stat(self.resume_from):  # it changed while we waited
                self._load_resume(self.resume_from)
            return self.run_dir
        if not cfg.out:
            return new_run_dir(cfg.model)
        run_dir = Path(cfg.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunRefused(f"--out {run_dir}: is a file; give a folder for the run")
        if run_dir.is_dir():
            self._lock(run_dir)
        if self._restarted_own_run(run_dir):  # torchrun restarted us: continue our own run
            restart = distributed.elastic_restart_count()
            if (run_dir / "last.pt").is_file():
                # the group may have been killed after the last epoch's checkpoint
                self._load_resume(run_dir, finished_ok=True)
                self.log(
                    f"restart {restart}: {run_dir} has finished all {self.cfg.epochs} epochs"
                    if self.finished
                    else f"restart {restart}: continuing {run_dir}"
                )
            else:  # it stopped before its first checkpoint: its files are ours to replace
                self.log(f"restart {restart}: starting {run_dir} over (no checkpoint yet)")
                self.overwrite = True
            return run_dir
        self._refuse_a_held_run(run_dir)
        return run_dir

    def _refuse_a_held_run(self, run_dir: Path) -> None:
        if holds_run(run_dir) and not self.overwrite:
            raise RunRefused(
                f"{run_dir}: already holds a run; continue it with --resume {run_dir}, or "
                "give --overwrite to start over in it"
            )

    def _setup(self) -> None:
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.run_dir = self._choose_run_dir()
        if self.finished:  # the kill may have come before the metrics files were rewritten
            if distributed.is_main():
                write_metrics(self.run_dir, self.checkpoint["history"])
            return
        cfg = self.cfg  # a restart may have loaded the run's own settings
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
        speed_up(
            self.module,
            self.device,
            fold_frozen_bn=cfg.fold_frozen_bn,
            memory_format=cfg.memory_format,
            sparse_roi_align=cfg.sparse_roi_align,
            compile=cfg.compile,
        )
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
        self.budget = self._time_budget()
        self.scheduler = build_scheduler(
            cfg, self.optimizer, self.iters_per_epoch, epochs=lambda: self.planned_epochs
        )
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device, amp=cfg.amp, log=self.log)
        if self.autocast_dtype is not None:
            keep_fp32_where_needed(self.module)
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
            self._start_writing(cfg)
        distributed.barrier()
        if self.world_size > 1:
            self.log(
                f"torchrun: {self.world_size} processes x batch {cfg.batch_size} = global batch "
                f"{cfg.global_batch_size}; lr {lr:g} (lr_scaling {cfg.lr_scaling}"
                + (f": {cfg.lr:g} x {self.world_size})" if cfg.lr_scaling == "linear" else ")")
            )
        self._t0 = self.clock()

    def _start_writing(self, cfg: TrainConfig) -> None:
        """Rank 0: make and lock the folder (a race for a new one is decided here: the second
        process finds it locked, or holding the first one's run), then write config.yaml."""
        fresh = self.lock is None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DetfitError(
                f"cannot make the run folder {self.run_dir}: {exc.strerror}"
            ) from None
        self._lock(self.run_dir)
        if fresh and self.checkpoint is None and not self.overwrite:
            self._refuse_a_held_run(self.run_dir)
        self.lock.claim()
        remove_stale_temp_files(self.run_dir)
        if self.overwrite and self.checkpoint is None:
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
        cfg.save(self.run_dir / "config.yaml")

    def _build_model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        cfg, ckpt = self.cfg, self.checkpoint
        if ckpt is not None:
            # with EMA, "model" holds the averaged (evaluated) weights and "train_model" the raw
            weights = ckpt.get("train_model") or ckpt["model"]
            model = rebuild_model(ckpt["model_info"], weights, f"{self.run_dir}/last.pt")
            return model, ckpt["model_info"]
        adapt_to_data(cfg, self.data, self.log)
        options = options_for_data(cfg, self.data, self.log)
        model = build_model(
            cfg.model,
            len(self.data.classes),
            weights=cfg.weights,
            weights_backbone=cfg.weights_backbone,
            **options,
        )
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
            callbacks.append(ProgressBar())
        return callbacks

    def _payload(self, rngs: list[dict[str, Any]] | None) -> dict[str, Any]:
        payload = {
            "model": self.eval_model.state_dict(),
            "model_info": self.info,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch + 1,  # counted from 1, as in metrics and every message
            "iteration": self.iteration,
            "evaluated": self.evaluated,
            "global_step": self.global_step,
            "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "meter": self.meter.state_dict(),
            "seconds": self.minutes * 60,
            "history": self.history,
            "metric_key": self.metric_key,
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "stopped": self.stop_reason,
        }
        if self.eval_model is not self.module:
            payload["train_model"] = self.module.state_dict()
        return payload

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.history = list(ckpt["history"])
        # "epoch" counts from 1; checkpoints from before mid-epoch saves (no "iteration") from 0
        self.epoch = int(ckpt["epoch"]) - ("iteration" in ckpt)
        self.iteration = int(ckpt.get("iteration", 0))
        self.evaluated = bool(ckpt.get("evaluated", True))  # older checkpoints: epoch ends only
        self.global_step = int(ckpt.get("global_step", 0))
        self.seconds_before = float(
            ckpt.get("seconds", 60 * (self.history or [{}])[-1].get("minutes", 0))
        )
        if ckpt.get("meter") and not self.evaluated:
            self.meter = LossMeter.from_state(ckpt["meter"])
        states = ckpt.get("callbacks") or {
            "EMA": {"updates": ckpt.get("ema_updates", 0)},
            "Checkpointer": {"best": ckpt.get("best", -1.0)},
        }
        for cb in self.callbacks:
            cb.load_state_dict(states.get(type(cb).__name__, {}))
        rngs = ckpt.get("rng")
        rngs = [rngs] if isinstance(rngs, dict) else rngs
        saved_world = int(ckpt.get("world_size", 1))
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
        cfg = self.cfg
        epoch = self.epoch + 1 if self.evaluated else self.epoch
        if self.budget is not None and not self.budget.measured:
            self.log(
                f"time budget {cfg.time_budget}: timing the first iterations and an evaluation "
                f"to plan the epochs (at most {self.budget.cap}, the epochs setting)"
            )
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
            result = self._evaluate(self.loaders.test)
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
            if self.budget is not None:
                self._replan(began if began_at == 0 else None)
            epoch += 1
        else:
            if self.budget is not None:
                self.log(
                    f"time budget {cfg.time_budget}: {self.planned_epochs} epochs trained and "
                    f"evaluated in {format_duration(self.minutes * 60)}"
                )

    def _evaluate(self, loader: Any) -> EvaluationResult:
        return evaluate(
            self.eval_model,
            loader,
            self.device,
            iou_types=iou_types(self.cfg.model),
            classes=self.data.classes,
            progress=self.progress,
            verbose=False,
            backend=self.cfg.eval_backend,
            tta=tta_views(self.cfg.tta, self.data.keypoint_names),
            autocast_dtype=self.autocast_dtype,
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
            if self.budget is not None and self._out_of_time(self.clock() - stepping):
                break

    # ---- the time budget (detfit.engine.budget) -----------------------------------------
    def _time_budget(self) -> TimeBudget | None:
        """The run's budget: a new one, or the checkpoint's plan (a new cap when ``epochs``
        changed on resume); None without ``time_budget``."""
        cfg, ckpt = self.cfg, self.checkpoint
        if not cfg.time_budget:
            return None
        fresh = TimeBudget.from_setting(cfg.time_budget, cfg.epochs)
        state = (ckpt or {}).get("budget")
        if not state:
            return fresh
        budget = TimeBudget.from_state(state)
        budget.seconds, budget.cap = fresh.seconds, cfg.epochs
        budget.planned = min(max(budget.planned, len(ckpt["history"])), cfg.epochs)
        if ckpt.get("evaluated", True) and budget.measured and ckpt["history"]:
            # a new budget or cap on resume: plan from the last epoch's cost
            cost = budget.seconds_per_iter * self.iters_per_epoch + budget.eval_seconds
            why = budget.plan(float(ckpt.get("seconds", 0.0)), len(ckpt["history"]), 0.0, cost)
            self.log(f"time budget {cfg.time_budget}: planned {budget.planned} epochs ({why})")
            self._planned = True
        return budget

    def _out_of_time(self, last_step: float) -> bool:
        """After a step that took ``last_step`` seconds: time the probe and plan; whether the
        epoch must end now, another step like it and the evaluation no longer fitting (the same
        answer on every rank)."""
        if not self.budget.measured:
            self._probe()
            return False
        if self.iteration >= self.iters_per_epoch:
            return False  # the evaluation comes next anyway
        late = self.budget.must_stop_now(self.minutes * 60 + last_step)
        if distributed.any_rank(late):
            self.stop_reason = (
                f"the time budget ({self.cfg.time_budget}) leaves only the time to evaluate, "
                f"at iteration {self.iteration}/{self.iters_per_epoch}"
            )
            return True
        return False

    def _probe(self) -> None:
        """Time the run's iterations after its first (which pays for allocations), up to
        PROBE_ITERS, then an evaluation of a few held-out batches, scaled to the whole split,
        and make the first plan. An epoch that ends sooner times its own evaluation instead."""
        from detfit.engine import budget as budget_module

        now = self.clock()
        if self._probe_from is None:
            self._probe_from = (now, self.iteration)
            return
        start, first = self._probe_from
        steps = self.iteration - first
        epoch_over = self.iteration >= self.iters_per_epoch
        if steps < budget_module.PROBE_ITERS - 1 and not epoch_over:
            return
        self.budget.seconds_per_iter = distributed.broadcast_from_main((now - start) / steps)
        if epoch_over:
            return  # the plan follows the epoch's evaluation (_replan)
        evaluating = self.clock()
        batches = list(itertools.islice(self.loaders.test, PROBE_EVAL_BATCHES))
        self._evaluate(batches)
        scale = len(self.loaders.test) / max(len(batches), 1)
        seconds = distributed.broadcast_from_main((self.clock() - evaluating) * scale)
        self.budget.eval_seconds = seconds
        left = (self.iters_per_epoch - self.iteration) * self.budget.seconds_per_iter + seconds
        self._plan(left, self.budget.seconds_per_iter * self.iters_per_epoch + seconds)

    def _replan(self, epoch_started: float | None) -> None:
        """After an epoch: plan again from what the epoch really cost, evaluation and
        checkpoints included (estimated from the measured rates when it was resumed part way)."""
        budget = self.budget
        if budget.seconds_per_iter is None:
            return
        if epoch_started is not None:
            cost = self.clock() - epoch_started
        else:
            cost = budget.seconds_per_iter * self.iters_per_epoch + budget.eval_seconds
        self._plan(0.0, distributed.broadcast_from_main(cost))

    def _plan(self, finish_current: float, epoch_cost: float) -> None:
        """Plan, on rank 0's numbers; the first plan is one line saying why, later changes too."""
        budget, before = self.budget, self.budget.planned
        why = budget.plan(self.minutes * 60, self.epoch + 1, finish_current, epoch_cost)
        budget.planned = distributed.broadcast_from_main(budget.planned)
        if not self._planned:
            rate = (
                f"{budget.seconds_per_iter:.2f} s per iteration x {self.iters_per_epoch} + "
                f"{format_duration(budget.eval_seconds)} evaluation"
            )
            self.log(
                f"time budget {self.cfg.time_budget}: planned {budget.planned} epochs ({rate}; "
                f"{why}); the learning-rate schedule ends there"
            )
        elif budget.planned != before:
            self.log(f"time budget: now {budget.planned} epochs instead of {before} ({why})")
        self._planned = True

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
