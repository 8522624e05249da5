"""MLflow tracking (``logger: mlflow``): one MLflow run per run folder, read with ``mlflow ui``.

- params: every resolved setting (``model_options.min_size``, ...), and the classes;
- per step: ``train/loss``, each loss (``train/loss_mask``, ...) and ``train/lr``;
- per epoch: every column of the metrics row under its ``metrics.csv`` name (``bbox_AP``,
  ``segm_AP75``, ``bbox_AP/person``, ``train_loss``, ``val_loss``, ``minutes``, ...);
- artifacts: ``config.yaml``, ``metrics.csv``/``.json`` and the run folder's pictures.

Every point is at the global step, so epoch values line up with the step curves. The store is
``mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in ``mlruns/`` of the current
folder (beside ``runs/``): MLflow 3 refuses its old plain-file store.

Resuming continues the same MLflow run without a duplicate point, as the TensorBoard logger's
purge does: MLflow cannot delete points, so none is sent that the checkpoint does not cover.
Step points wait in this callback's state (saved in ``last.pt``) until ``last.pt`` is written,
then go; a resume sends those a kill kept from going, skipping the steps the store already
has. Epoch rows go after their checkpoint; a resume sends the rows of ``trainer.history`` the
store lacks. Rank 0 alone logs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detfit.config import flatten_settings
from detfit.engine.callbacks import Callback
from detfit.errors import DetfitError

if TYPE_CHECKING:
    from detfit.engine.step import StepResult
    from detfit.engine.trainer import Trainer
    from detfit.eval.loop import EvaluationResult

DEFAULT_STORE = Path("mlruns")
ARTIFACT_FILES = ("config.yaml", "metrics.csv", "metrics.json")
PICTURES = ("*.png", "*.jpg")
BATCH = 1000  # MLflow's most metrics per log_batch call (and 100 params)
# MLflow's allowed characters in a metric or param name; any other becomes "_"
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")


def mlflow_client_class() -> type:
    """MLflow's client, or a one-line error naming the extra that installs MLflow."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise DetfitError(
            "logger: mlflow needs the mlflow package: pip install 'detfit[mlflow]'"
        ) from None
    return MlflowClient


def tracking_uri(configured: str | None) -> str:
    """The store a new run logs to: the setting, ``$MLFLOW_TRACKING_URI``, or SQLite in
    ``./mlruns`` (absolute, so a resume from another folder finds the same store)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{DEFAULT_STORE.resolve() / 'mlflow.db'}"


def metric_name(key: str) -> str:
    return _NOT_ALLOWED.sub("_", key)


def flat_settings(data: dict[str, Any]) -> dict[str, str]:
    """Settings as MLflow params: mappings flattened with dots, values as text."""
    return {metric_name(k): str(v) for k, v in flatten_settings(data).items()}


def open_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing; in detfit's default SQLite store its
    artifacts go beside the database (``mlruns/artifacts``), not into the current folder."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


class MLflowLogger(Callback):
    """Params, step and epoch metrics, and artifacts of the run in an MLflow store."""

    main_process_only = True

    def __init__(self) -> None:
        self.client_class = mlflow_client_class()  # fails before any folder is made
        self.client: Any = None
        self.uri: str | None = None
        self.run_id: str | None = None
        self.pending: list[tuple[str, float, int, int]] = []  # (key, value, ms, step)
        self.epoch_steps: dict[int, int] = {}  # epoch (from 1) -> global step at its end

    # ---- state carried by checkpoints -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "run_id": self.run_id,
            "pending": list(self.pending),
            "epoch_steps": dict(self.epoch_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.uri = state.get("uri")
        self.run_id = state.get("run_id")
        self.pending = [tuple(p) for p in state.get("pending", [])]
        self.epoch_steps = {int(k): int(v) for k, v in state.get("epoch_steps", {}).items()}

    # ---- events -----------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.uri = self.uri or tracking_uri(cfg.mlflow_tracking_uri)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = self.client_class(self.uri)
        tags = {
            "mlflow.runName": trainer.run_dir.name,
            "detfit.run_dir": str(trainer.run_dir.resolve()),
            "detfit.model": cfg.model,
            **cfg.mlflow_tags,
        }
        if self.run_id is not None and self._run_exists(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
            self._log_changed_params(trainer)
            self._catch_up(trainer)
            return
        experiment = open_experiment(self.client, cfg.mlflow_experiment, self.uri)
        self.run_id = self.client.create_run(experiment, tags=tags).info.run_id
        names = [c for c in trainer.data.classes if c != "__background__"]
        params = {**flat_settings(cfg.to_dict()), "classes": ", ".join(names)}
        self._log_params(params)
        self._catch_up(trainer)  # a logger added on resume: the epochs trained so far

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if result.skipped:
            return
        now, step = _now_ms(), trainer.global_step
        values = {"loss": result.loss, **result.losses}
        self.pending += [(f"train/{k}", float(v), now, step) for k, v in values.items()]
        self.pending.append(("train/lr", trainer.optimizer.param_groups[0]["lr"], now, step))

    def on_evaluation(self, trainer: Trainer, result: EvaluationResult) -> None:
        # before the epoch's checkpoint, so that last.pt knows where the epoch's row goes
        self.epoch_steps[trainer.epoch + 1] = trainer.global_step

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        if path.name == "last.pt":  # the points it covers may go now
            self._flush()

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self._log_row(row, self.epoch_steps.get(row["epoch"], trainer.global_step))
        self._log_artifacts(trainer.run_dir)

    def on_interrupt(self, trainer: Trainer, reason: str) -> None:
        self._end("KILLED")

    def on_train_end(self, trainer: Trainer) -> None:
        self._log_artifacts(trainer.run_dir)
        self._end("FINISHED")

    # ---- helpers ----------------------------------------------------------------------------
    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _log_changed_params(self, trainer: Trainer) -> None:
        """MLflow params cannot change: a setting changed on resume (``epochs``) is a new param
        if absent, else a ``resumed.<name>`` tag."""
        logged = self.client.get_run(self.run_id).data.params
        current = flat_settings(trainer.cfg.to_dict())
        self._log_params({k: v for k, v in current.items() if k not in logged})
        for key, value in current.items():
            if key in logged and logged[key] != value:
                self.client.set_tag(self.run_id, f"resumed.{key}", value)

    def _catch_up(self, trainer: Trainer) -> None:
        """Send what a kill kept from going: pending step points past the store's last step of
        each key, and the epoch rows of the history the store lacks."""
        last: dict[str, int] = {}
        for key in dict.fromkeys(k for k, *_ in self.pending):
            history = self.client.get_metric_history(self.run_id, key)
            last[key] = max((m.step for m in history), default=-1)
        self.pending = [p for p in self.pending if p[3] > last[p[0]]]
        self._flush()
        logged = {int(m.value) for m in self.client.get_metric_history(self.run_id, "epoch")}
        for row in trainer.history:
            if int(row["epoch"]) not in logged:
                step = self.epoch_steps.get(row["epoch"], row["epoch"] * trainer.iters_per_epoch)
                self._log_row(row, step)

    def _log_row(self, row: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [
            Metric(metric_name(k), float(v), now, step)
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self._send(metrics)

    def _flush(self) -> None:
        from mlflow.entities import Metric

        self._send([Metric(k, v, ms, step) for k, v, ms, step in self.pending])
        self.pending = []

    def _send(self, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def _log_artifacts(self, run_dir: Path) -> None:
        files = [run_dir / name for name in ARTIFACT_FILES]
        files += sorted(p for pattern in PICTURES for p in run_dir.glob(pattern))
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def _end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self._flush()
            self.client.set_terminated(self.run_id, status=status)


def _now_ms() -> int:
    return int(time.time() * 1000)
