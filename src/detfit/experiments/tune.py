"""``detfit tune``: an Optuna study over any settings, each trial an ordinary run folder.

studies/<name>/  study.yaml  study.db  trials/trial-0000/ ...  trials.csv  best.yaml
                 history.png  importances.png  parallel_coordinates.png  intermediate.png

- The study lives in Optuna's storage (SQLite in the study folder, or any RDB URL several
  machines share), so running the same command again continues it: ``--trials N`` is the number
  of finished (complete or pruned) trials wanted in all.
- A trial killed with its process (kill -9) stays "running" in the storage; the next run marks
  it failed (on this machine by its dead process id, elsewhere by Optuna's heartbeat), and a
  failed trial never counts as a result.
- After every epoch a trial reports its best metric so far (what ``best.pt`` holds) to the
  pruner (median or Hyperband), which may stop it there.
- ``--jobs J`` trials at once, as processes: CPU threads divided among them, one GPU each.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from detfit.engine.callbacks import Callback
from detfit.errors import DetfitError
from detfit.experiments.runs import format_csv, format_table
from detfit.experiments.search import Search, SearchError
from detfit.fileio import atomic_write_text

if TYPE_CHECKING:
    from detfit.engine.trainer import Trainer

STUDY_FILE = "study.yaml"
TRIALS_DIR = "trials"
# Optuna's heartbeat: a trial whose process stopped beating this long ago is failed. A trial on
# this machine whose process is gone is failed at once (see fail_dead_trials).
HEARTBEAT_S = int(os.environ.get("DETFIT_TUNE_HEARTBEAT_S", "30"))
PICTURES = {
    "history.png": "plot_optimization_history",
    "intermediate.png": "plot_intermediate_values",
    "importances.png": "plot_param_importances",
    "parallel_coordinates.png": "plot_parallel_coordinate",
}


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise DetfitError(
            "detfit tune needs the optuna package: pip install 'detfit[tune]'"
        ) from None
    # the heartbeat and the pictures are "experimental" in optuna: not a warning per call
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@dataclass
class Budget:
    """How much of the study this invocation runs."""

    trials: int  # finished trials wanted in the study, in all
    deadline: float | None  # time.time() after which no trial starts and running ones stop
    jobs: int = 1


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{study_dir.resolve() / 'study.db'}"


def open_storage(url: str) -> Any:
    optuna = optuna_module()
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=kwargs,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=3 * HEARTBEAT_S,
    )


def make_pruner(name: str) -> Any:
    optuna = optuna_module()
    if name == "median":
        # two finished trials before any is pruned, and none after its first epoch alone: the
        # best of a search was pruned there once, a slow starter (BENCHMARKS.md, tune_pruning)
        # (optuna's steps here are epochs counted from 1: step 1 is warm-up)
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(search: Search, storage: str, create: bool = True) -> Any:
    optuna = optuna_module()
    sampler = optuna.samplers.TPESampler(seed=search.seed)
    kwargs = dict(
        study_name=search.name,
        storage=open_storage(storage),
        sampler=sampler,
        pruner=make_pruner(search.pruner),
    )
    if not create:
        return optuna.load_study(**kwargs)
    return optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)


def prepare_study_dir(search: Search, study_dir: Path, storage: str) -> Any:
    """Create or reopen the study; a folder or storage holding another study is refused before
    any trial runs. Returns the study."""
    described = search.describe()
    saved_file = study_dir / STUDY_FILE
    if saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text())
        if saved != described:
            raise SearchError(
                f"{study_dir}: holds another study ({differences(saved, described)}); "
                "give another --out, or its own search file to continue it"
            )
    elif study_dir.exists() and any(study_dir.iterdir()):
        raise SearchError(
            f"{study_dir}: holds files but no {STUDY_FILE}: not a study folder; give another --out"
        )
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(search, storage)
    stored = study.user_attrs.get("search")
    if stored is not None and stored != described:
        raise SearchError(
            f"{storage}: study {search.name!r} is another search ({differences(stored, described)}); "
            "give it another name"
        )
    if stored is None:
        study.set_user_attr("search", described)
    atomic_write_text(saved_file, yaml.safe_dump(described, sort_keys=False))
    return study


def differences(saved: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*saved, *new]) if saved.get(k) != new.get(k)]
    if keys == ["name"]:
        return f"study {saved.get('name')!r}"
    return f"its {', '.join(keys)} differ" + ("s" if len(keys) == 1 else "")


def fail_dead_trials(study: Any) -> list[int]:
    """Mark failed the running trials whose process on this machine is gone (a kill -9); those
    of other machines are left to Optuna's heartbeat. Returns their numbers."""
    import psutil

    optuna = optuna_module()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not psutil.pid_exists(pid):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    optuna.storages.fail_stale_trials(study)
    return failed


def counted(study: Any) -> int:
    """Trials that count toward ``--trials``: finished (complete, pruned) or running."""
    states = optuna_module().trial.TrialState
    return len(
        study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.RUNNING))
    )


class TrialReporter(Callback):
    """After each epoch: report the best metric so far to the trial; stop the run when the
    pruner says so, or when the study's time is up."""

    def __init__(self, trial: Any, metric: str | None, deadline: float | None) -> None:
        self.trial, self.metric, self.deadline = trial, metric, deadline
        self.best = -math.inf
        self.best_epoch = 0
        self.stopped: str | None = None  # "pruned" or "time"

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        key = self.metric or trainer.metric_key
        if key not in row:
            raise DetfitError(f"metric {key}: not in the metrics of {trainer.cfg.model}")
        if self.best == -math.inf:
            self.trial.set_user_attr("metric", key)
        if row[key] > self.best:
            self.best, self.best_epoch = float(row[key]), int(row["epoch"])
        self.trial.report(self.best, int(row["epoch"]))
        last = int(row["epoch"]) >= trainer.cfg.epochs
        if not last and self.trial.should_prune():
            self.stopped = "pruned"
        elif not last and self.deadline is not None and time.time() > self.deadline:
            self.stopped = "time"
        trainer.should_stop = self.stopped is not None


def cpu_threads(jobs: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def run_trial(
    trial: Any,
    search: Search,
    study_dir: Path,
    budget: Budget,
    worker: int,
    log: Callable[[str], None],
) -> float:
    """The objective: one training with the trial's settings, in ``trials/trial-NNNN``."""
    import torch

    from detfit.config import TrainConfig
    from detfit.engine import Trainer

    optuna = optuna_module()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    values = {p.key: p.suggest(trial) for p in search.space}
    settings = search.trial_settings(values)
    run_dir = study_dir / TRIALS_DIR / f"trial-{trial.number:04d}"
    settings["out"] = str(run_dir)
    searched = {p.key.split(".")[0] for p in search.space}
    if "threads" not in searched and settings.get("threads") is None:
        settings["threads"] = cpu_threads(budget.jobs)
    if (
        "device" not in searched
        and settings.get("device") in ("auto", "cuda")
        and torch.cuda.is_available()
    ):
        settings["device"] = f"cuda:{worker % torch.cuda.device_count()}"
    if "mlflow" in TrainConfig.from_dict(settings).loggers():
        if not settings.get("mlflow_tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
            settings["mlflow_tracking_uri"] = (
                f"sqlite:///{study_dir.resolve() / 'mlruns' / 'mlflow.db'}"
            )
        if settings.get("mlflow_experiment") == "detfit":
            settings["mlflow_experiment"] = search.name
        settings["mlflow_tags"] = {
            **settings.get("mlflow_tags", {}),
            "optuna.study": search.name,
            "optuna.trial": str(trial.number),
        }
    cfg = TrainConfig.from_dict(settings, f"trial {trial.number}")
    trial.set_user_attr("run_dir", str(run_dir))
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    log(f"trial {trial.number}: {shown}")
    reporter = TrialReporter(trial, search.metric, budget.deadline)
    say = lambda line: log(f"trial {trial.number}: {line}")  # noqa: E731
    start = time.perf_counter()
    try:
        Trainer(cfg, callbacks=[reporter], progress=False, log=say).fit()
    except DetfitError:
        raise  # the user's to fix (data, stop request): the study stops with its one line
    except Exception as exc:  # this trial's own failure (out of memory, ...): the study goes on
        log(f"trial {trial.number}: failed: {type(exc).__name__}: {exc}")
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        return math.nan  # optuna records a failed trial and carries on
    trial.set_user_attr("minutes", round((time.perf_counter() - start) / 60, 3))
    trial.set_user_attr("best_epoch", reporter.best_epoch)
    if reporter.stopped:
        trial.set_user_attr("stopped", reporter.stopped)
        log(
            f"trial {trial.number}: {reporter.stopped} after epoch {reporter.best_epoch} "
            f"(best {reporter.best:.4f})"
        )
        raise optuna.TrialPruned()
    log(f"trial {trial.number}: best {reporter.best:.4f} at epoch {reporter.best_epoch}")
    return reporter.best


def work(
    search: Search,
    study_dir: Path,
    storage: str,
    budget: Budget,
    worker: int,
    log: Callable[[str], None] = print,
    ready: Any = None,
) -> None:
    """One process's share: trials until the study has ``budget.trials`` or time is up.
    ``ready`` (an Event) is set once the study is open: the processes start trials together."""
    optuna = optuna_module()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(search, storage, create=False)
    if ready is not None:
        ready.set()
    if counted(study) >= budget.trials:
        return
    timeout = None if budget.deadline is None else max(0.0, budget.deadline - time.time())
    if timeout == 0.0:
        return
    states = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.RUNNING,
    )
    study.optimize(
        lambda trial: run_trial(trial, search, study_dir, budget, worker, log),
        timeout=timeout,
        callbacks=[optuna.study.MaxTrialsCallback(budget.trials, states=states)],
        gc_after_trial=True,
    )


def _worker_main(
    search: Search, study_dir: Path, storage: str, budget: Budget, worker: int, ready: Any
) -> None:
    """A ``--jobs`` process: dies with its parent (Linux), so a kill -9 leaves no trial running."""
    _die_with_parent()
    try:
        work(search, study_dir, storage, budget, worker, ready=ready)
    except DetfitError as exc:
        print(f"detfit: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        # without glibc the worker outlives a killed parent; its trial is then failed by pid
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def tune(
    search_file: str | Path,
    study_dir: str | Path | None = None,
    trials: int = 20,
    minutes: float | None = None,
    jobs: int = 1,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or continue) the study of ``search_file``; writes the report; returns its folder."""
    from detfit.experiments.search import load_search

    optuna = optuna_module()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = load_search(search_file)
    study_dir = Path(study_dir) if study_dir else Path("studies") / search.name
    storage = storage or default_storage(study_dir)
    study = prepare_study_dir(search, study_dir, storage)
    failed = fail_dead_trials(study)
    if failed:
        log(f"trial(s) {', '.join(map(str, failed))}: their process is gone: marked failed")
    deadline = time.time() + 60 * minutes if minutes else None
    budget = Budget(trials, deadline, jobs)
    todo = max(0, trials - counted(study))
    log(
        f"study {search.name} in {study_dir}: {trials - todo} trial(s) counted, {todo} to run"
        + (f", {jobs} at a time" if jobs > 1 and todo else "")
    )
    if todo:
        run_jobs(search, study_dir, storage, budget, min(jobs, todo), log)
    write_report(study_dir, search, open_study(search, storage, create=False), log)
    return study_dir


def run_jobs(
    search: Search,
    study_dir: Path,
    storage: str,
    budget: Budget,
    jobs: int,
    log: Callable[[str], None],
) -> None:
    """This process runs trials too; ``jobs - 1`` more processes beside it."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked torch threads or open databases
    events = [context.Event() for _ in range(1, jobs)]
    others = [
        context.Process(target=_worker_main, args=(search, study_dir, storage, budget, i, ready))
        for i, ready in enumerate(events, 1)
    ]
    for process in others:
        process.start()
    try:
        for process, ready in zip(others, events):  # wait for their imports: start together
            while not ready.wait(1) and process.is_alive():
                pass
        work(search, study_dir, storage, budget, 0, log)
    finally:
        for process in others:
            process.join()
    bad = [p.exitcode for p in others if p.exitcode not in (0, None)]
    if bad:
        raise DetfitError(f"{len(bad)} tune process(es) stopped with an error (above)")


# ---- the report ---------------------------------------------------------------------------
def trial_rows(study: Any, search: Search) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value
        if value is None and trial.intermediate_values:
            value = max(trial.intermediate_values.values())  # a pruned trial's best epoch
        attrs = trial.user_attrs
        row = {
            "trial": trial.number,
            "state": trial.state.name.lower()
            + (f" ({attrs['stopped']})" if attrs.get("stopped") == "time" else ""),
            "best": None if value is None else round(value, 4),
            "epoch": attrs.get("best_epoch", len(trial.intermediate_values) or None),
            "epochs": len(trial.intermediate_values),  # trained (scored): fewer when pruned
            "minutes": attrs.get("minutes"),
        }
        params = {
            p.key: p.decode(trial.params[p.key]) for p in search.space if p.key in trial.params
        }
        row.update({k: _short(v) for k, v in params.items()})
        row["run"] = attrs.get("run_dir", "")
        rows.append(row)
    return rows


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def write_best(study_dir: Path, search: Search, study: Any) -> Path | None:
    """``best.yaml``: the best complete trial's settings, as ``detfit train --config`` takes them."""
    from detfit.config import TrainConfig

    states = optuna_module().trial.TrialState
    if not study.get_trials(deepcopy=False, states=(states.COMPLETE,)):
        return None
    best = study.best_trial
    values = {p.key: p.decode(best.params[p.key]) for p in search.space}
    cfg = TrainConfig.from_dict(search.trial_settings(values), f"trial {best.number}")
    path = study_dir / "best.yaml"
    header = (
        f"# study {search.name}: trial {best.number}, {best.user_attrs.get('metric')} "
        f"{best.value:.4f}\n"
        f"# detfit train --config {path}\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def write_pictures(
    study_dir: Path, study: Any, metric: str, log: Callable[[str], None]
) -> list[Path]:
    """Optuna's own matplotlib pictures of the study, with ``metric`` named where optuna says
    "Objective Value"; one it cannot draw yet (importances need two complete trials) is one
    line, not an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from matplotlib.ticker import MaxNLocator

    from detfit.fileio import atomic_write

    written = []
    for name, function in PICTURES.items():
        named = {} if function == "plot_intermediate_values" else {"target_name": metric}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" and empty-study warnings
            try:
                axes = getattr(vis, function)(study, **named)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                log(f"{name}: not drawn yet ({exc})")
                continue
        if function == "plot_intermediate_values":  # optuna's "step" is detfit's epoch
            axes.set_xlabel("epoch")
            axes.set_ylabel(f"best {metric} so far")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5.5)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        atomic_write(study_dir / name, lambda f, data=buffer.getvalue(): f.write(data))
        written.append(study_dir / name)
    return written


def write_report(study_dir: Path, search: Search, study: Any, log: Callable[[str], None]) -> None:
    fail_dead_trials(study)
    rows = trial_rows(study, search)
    atomic_write_text(study_dir / "trials.csv", format_csv(rows) if rows else "")
    log(format_table([{k: v for k, v in r.items() if k != "run"} for r in rows]))
    metric = search.metric or next(
        (t.user_attrs["metric"] for t in study.trials if "metric" in t.user_attrs), "metric"
    )
    write_pictures(study_dir, study, metric, log)
    best = write_best(study_dir, search, study)
    if best is None:
        log(f"no complete trial yet: {study_dir}/trials.csv lists them")
        return
    trial = study.best_trial
    log(
        f"best: trial {trial.number}, {trial.value:.4f} ({trial.user_attrs.get('run_dir')}); "
        f"train with it: detfit train --config {best}"
    )
