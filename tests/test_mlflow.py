"""``logger: mlflow``: the store, read back with MLflow's own client, holds every setting as a
param, the losses and lr per step, every metrics.csv column per epoch at the global step, and the
run folder's files as artifacts; a resumed run continues the same MLflow run, each point once;
without the package, one line names the extra."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_config
from detfit.checkpoint import load_checkpoint
from detfit.engine import Trainer
from detfit.engine.mlflow_logger import (
    MLflowLogger,
    flat_settings,
    metric_name,
    mlflow_client_class,
)
from detfit.errors import DetfitError

MlflowClient = pytest.importorskip("mlflow").MlflowClient


def store_uri(folder) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tracked_run(synthetic_root, tmp_path_factory):
    """Two epochs logged to MLflow and TensorBoard at once, with pictures."""
    folder = tmp_path_factory.mktemp("tracked")
    cfg = run_config(synthetic_root, folder / "runs" / "run").replace(
        logger=["tensorboard", "mlflow"],
        mlflow_tracking_uri=store_uri(folder),
        mlflow_experiment="tests",
        plots=True,
    )
    run_dir = Trainer(cfg, progress=False, log=lambda s: None).fit()
    return run_dir, MlflowClient(store_uri(folder))


def only_run(client, experiment="tests"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1  # one MLflow run per run folder, resumed or not
    return runs[0]


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def history(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_every_setting_is_a_param(tracked_run):
    run_dir, client = tracked_run
    run = only_run(client)
    settings = load_checkpoint(run_dir / "last.pt")["config"]
    expected = flat_settings(settings)
    assert expected["model_options.min_size"] == "64"
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.data.params["classes"] == "person"
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (run_dir / "tensorboard").is_dir()  # both loggers ran


def check_against_metrics_csv(client, run_id, run_dir) -> None:
    """Each epoch's row at the global step where the epoch ended; every step's losses once,
    averaging to the row's train_* values."""
    rows = read_csv(run_dir / "metrics.csv")
    ends = history(client, run_id, "epoch")
    assert [int(v) for _, v in ends] == [int(r["epoch"]) for r in rows]
    for (step, _), row in zip(ends, rows):
        for key, text in row.items():
            if not text:
                continue
            logged = dict(history(client, run_id, metric_name(key)))
            assert len(logged) == len(rows), key  # one point per epoch
            assert logged[step] == pytest.approx(float(text), rel=1e-6, abs=1e-9), key
    losses = history(client, run_id, "train/loss")
    steps = [s for s, _ in losses]
    assert steps == list(range(1, ends[-1][0] + 1))  # every step once, numbered from 1
    start = 0
    for (end, _), row in zip(ends, rows):
        epoch = [v for s, v in losses if start < s <= end]
        assert np.mean(epoch) == pytest.approx(float(row["train_loss"]), rel=1e-6)
        mask = [v for s, v in history(client, run_id, "train/loss_mask") if start < s <= end]
        assert np.mean(mask) == pytest.approx(float(row["train_loss_mask"]), rel=1e-6)
        lr = dict(history(client, run_id, "train/lr"))[end]
        assert lr == pytest.approx(float(row["train_lr"]), rel=1e-6)
        start = end


def test_metrics_are_the_metrics_csv_rows(tracked_run):
    run_dir, client = tracked_run
    run = only_run(client)
    assert {"bbox_AP", "segm_AP75", "bbox_AP/person", "segm_AP/person"} <= set(run.data.metrics)
    check_against_metrics_csv(client, run.info.run_id, run_dir)


def test_run_files_are_artifacts(tracked_run, tmp_path):
    run_dir, client = tracked_run
    run_id = only_run(client).info.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    expected = {"config.yaml", "metrics.csv", "metrics.json", "results.png", "pr_curve_bbox.png"}
    assert expected <= names
    copy = client.download_artifacts(run_id, "metrics.csv", str(tmp_path))
    assert Path(copy).read_text() == (run_dir / "metrics.csv").read_text()


def test_a_resumed_run_continues_the_same_mlflow_run(tracked_run, tmp_path):
    """The checkpoint names the MLflow run; its step points, saved with it and already sent,
    are not sent twice, and the third epoch lines up after the first two."""
    run_dir, client = tracked_run
    before = only_run(client)
    state = load_checkpoint(run_dir / "last.pt")["callbacks"]["MLflowLogger"]
    assert state["run_id"] == before.info.run_id and state["pending"]  # sent after the save
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    Trainer(resume=run, overrides={"epochs": 3}, progress=False, log=lambda s: None).fit()
    after = only_run(client)
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    assert after.data.params["epochs"] == "2" and after.data.tags["resumed.epochs"] == "3"
    check_against_metrics_csv(client, after.info.run_id, run)


def test_rank_zero_alone_logs():
    # the real thing under torchrun: test_distributed.py's DDP run logs to MLflow too
    assert MLflowLogger.main_process_only


def test_missing_package_is_one_line_naming_the_extra(monkeypatch, synthetic_root, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    with pytest.raises(DetfitError) as info:
        mlflow_client_class()
    assert (
        str(info.value) == "logger: mlflow needs the mlflow package: pip install 'detfit[mlflow]'"
    )
    cfg = run_config(synthetic_root, tmp_path / "run").replace(logger="mlflow")
    with pytest.raises(DetfitError, match=r"detfit\[mlflow\]"):
        Trainer(cfg, progress=False, log=lambda s: None).fit()
    assert not (tmp_path / "run").exists()  # refused before a run folder is made
