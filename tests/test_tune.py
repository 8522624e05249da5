"""``detfit tune`` and ``detfit runs`` on tiny trials: the study in SQLite, continued by a second
command with two processes sharing the file; a kill -9 fails only the trial in flight; the
pruner stops a trial through the epoch callback; best.yaml is a config ``detfit train`` takes;
the pictures and tables are written; bad search files are one line, exit 2, before any trial."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from conftest import FAST_EVAL, REPO, SMALL, run_config, run_main
from detfit.config import TrainConfig, load_settings, merge_settings

optuna = pytest.importorskip("optuna")

from detfit.errors import DetfitError  # noqa: E402
from detfit.experiments.tune import (  # noqa: E402
    TrialReporter,
    default_storage,
    open_storage,
    optuna_module,
    tune,
)

SPACE = {
    "lr": {"low": "1e-4", "high": 1.0e-2, "log": True},  # "1e-4": YAML 1.1 reads it as text
    "warmup_iters": {"low": 0, "high": 10},
    "model_options.min_size": {"choices": [64, [64, 80]]},
}


def write_search(folder, synthetic_root, **changes) -> object:
    """A base config of one-step epochs on the synthetic set, and a search over three settings."""
    base = run_config(synthetic_root, folder / "unused").to_dict()
    base.update(epochs=2, max_iters_per_epoch=1, num_test=2, out=None)
    base["model_options"] = {**SMALL, **FAST_EVAL}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    search = {"name": "tiny", "config": "base.yaml", "space": SPACE, "seed": 0, **changes}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(search, sort_keys=False))
    return path


def quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def study(synthetic_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    search = write_search(folder, synthetic_root)
    study_dir = tune(search, folder / "study", trials=3, log=quiet)
    return search, study_dir


def load(study_dir):
    return optuna.load_study(study_name="tiny", storage=open_storage(default_storage(study_dir)))


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_trials_are_run_folders_with_their_settings(study):
    _, study_dir = study
    trials = load(study_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for trial in trials:
        run = study_dir / "trials" / f"trial-{trial.number:04d}"
        assert trial.user_attrs["run_dir"] == str(run)
        cfg = TrainConfig.load(run / "config.yaml")
        assert cfg.lr == trial.params["lr"] and 1e-4 <= cfg.lr <= 1e-2
        assert cfg.warmup_iters == trial.params["warmup_iters"]
        assert (
            yaml.safe_load(trial.params["model_options.min_size"]) == cfg.model_options["min_size"]
        )
        assert cfg.threads >= 1 and cfg.model_options["max_size"] == 96  # base kept
        rows = read_csv((run / "metrics.csv").read_text())
        assert trial.value == pytest.approx(max(float(r["segm_AP"]) for r in rows))
        assert trial.intermediate_values.keys() == {1, 2}  # one report per epoch
        assert (run / "last.pt").is_file() and (run / "best.pt").is_file()


def test_best_yaml_is_the_best_trials_config(study):
    _, study_dir = study
    best = load(study_dir).best_trial
    # what `detfit train --config best.yaml` does with it
    cfg = TrainConfig.from_dict(merge_settings(load_settings(study_dir / "best.yaml"), {}))
    trial_cfg = TrainConfig.load(study_dir / "trials" / f"trial-{best.number:04d}" / "config.yaml")
    assert cfg.out is None and cfg.lr == best.params["lr"]
    ignored = {"out", "run_id", "threads", "world_size", "global_batch_size"}  # the run says these
    trial = trial_cfg.to_dict()
    # the trial's config.yaml also records what the recipe chose from the data (here anchors
    # halved for the small synthetic objects); best.yaml leaves it to be chosen again
    adapted = set(trial["model_options"]) - set(cfg.model_options)
    assert adapted == {"anchor_sizes"}
    trial["model_options"] = {k: v for k, v in trial["model_options"].items() if k not in adapted}
    assert {k: v for k, v in cfg.to_dict().items() if k not in ignored} == {
        k: v for k, v in trial.items() if k not in ignored
    }


def test_table_and_pictures(study):
    _, study_dir = study
    rows = read_csv((study_dir / "trials.csv").read_text())
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert {"state", "best", "epoch", "minutes", "lr", "model_options.min_size", "run"} <= set(
        rows[0]
    )
    for name in ("history.png", "importances.png", "parallel_coordinates.png", "intermediate.png"):
        data = (study_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_runs_table_compares_the_trials(study, monkeypatch, capsys):
    _, study_dir = study
    code, out, err = run_main(monkeypatch, capsys, "runs", study_dir / "trials", "--csv")
    assert code == 0, err
    rows = read_csv(out)
    bests = [float(r["best"]) for r in rows]
    assert bests == sorted(bests, reverse=True) and len(rows) == 3  # best first
    trials = {t.number: t for t in load(study_dir).get_trials()}
    for row in rows:
        trial = trials[int(row["run"].removeprefix("trial-"))]
        assert float(row["lr"]) == pytest.approx(trial.params["lr"])
        assert float(row["best"]) == pytest.approx(trial.value, abs=1e-4)
        assert row["epochs"] == "2/2" and row["model"] == "maskrcnn_mobilenet_v2_fpn"
    # settings equal in every run are not columns
    assert "warmup_iters" in rows[0] and "batch_size" not in rows[0] and "out" not in rows[0]
    code, out, _ = run_main(
        monkeypatch, capsys, "runs", study_dir / "trials", "--sort", "warmup_iters", "--csv"
    )
    values = [int(r["warmup_iters"]) for r in read_csv(out)]
    assert values == sorted(values) and len(values) == 3
    code, out, _ = run_main(monkeypatch, capsys, "runs", study_dir / "trials")
    header, *lines = out.splitlines()
    assert header.split()[:7] == ["run", "best", "metric", "epoch", "epochs", "minutes", "model"]
    assert len(lines) == 3 and float(lines[0].split()[1]) == float(rows[0]["best"])
    code, _, err = run_main(monkeypatch, capsys, "runs", study_dir / "trials", "--sort", "nope")
    assert code == 2 and err.count("\n") == 1 and "--sort nope: not a column" in err


def test_rerun_continues_with_two_processes_sharing_the_sqlite_file(study):
    search, study_dir = study
    tune(search, study_dir, trials=5, jobs=2, log=quiet)
    trials = load(study_dir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state.name == "COMPLETE" for t in trials)
    new = trials[3:]
    assert len({t.user_attrs["pid"] for t in new}) == 2  # one trial each, in two processes
    assert len(read_csv((study_dir / "trials.csv").read_text())) == 5


def test_kill_9_fails_only_the_trial_in_flight(synthetic_root, tmp_path):
    """Its trials also log to MLflow: each an MLflow run in the study folder, tagged."""
    search = write_search(tmp_path, synthetic_root, settings={"logger": "mlflow"})
    study_dir = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "detfit", "tune", str(search), "--out", str(study_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = study_dir / "trials" / "trial-0000" / "config.yaml"
    deadline = time.monotonic() + 120
    while not config.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert config.exists(), "the first trial never started"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load(study_dir).get_trials()[0].state.name == "RUNNING"  # as the kill left it
    lines = []
    tune(search, study_dir, trials=1, log=lines.append)
    assert lines[0] == "trial(s) 0: their process is gone: marked failed"
    trials = load(study_dir).get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert (study_dir / "best.yaml").read_text().startswith("# study tiny: trial 1,")
    client = pytest.importorskip("mlflow").MlflowClient(
        f"sqlite:///{study_dir / 'mlruns' / 'mlflow.db'}"
    )
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (run,) = client.search_runs([experiment], "tags.`optuna.trial` = '1'")
    assert run.data.tags["optuna.study"] == "tiny" and run.info.status == "FINISHED"
    assert run.data.tags["detfit.run_dir"] == str((study_dir / "trials" / "trial-0001").resolve())


def test_the_pruner_stops_a_trial_after_its_epoch():
    """Two finished trials scored 0.5 per epoch; a third at 0.1 after its first epoch is below
    their median: the callback stops its run there and marks it pruned."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(2))
    for _ in range(2):
        trial = study.ask()
        trial.report(0.5, 1)
        study.tell(trial, 0.5)
    trial = study.ask()
    reporter = TrialReporter(trial, None, None)
    trainer = SimpleNamespace(
        metric_key="segm_AP", cfg=SimpleNamespace(epochs=3), should_stop=False
    )
    reporter.on_epoch_end(trainer, {"epoch": 1, "segm_AP": 0.1})
    assert trainer.should_stop and reporter.stopped == "pruned"
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {1: 0.1}
    trial = study.ask()
    reporter = TrialReporter(trial, None, None)
    trainer.should_stop = False
    reporter.on_epoch_end(trainer, {"epoch": 1, "segm_AP": 0.7})  # above the median: goes on
    assert not trainer.should_stop and reporter.best == 0.7
    reporter.deadline = time.time() - 1  # the study's --time is up: stops after this epoch
    reporter.on_epoch_end(trainer, {"epoch": 2, "segm_AP": 0.6})
    assert trainer.should_stop and reporter.stopped == "time"
    assert (reporter.best, reporter.best_epoch) == (0.7, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("space: [", "cannot read the search"),
        (
            {"space": {"lrr": {"low": 0.1, "high": 1.0}}},
            "space.lrr: not a setting (did you mean 'lr'?)",
        ),
        (
            {"space": {"lr": {"low": -1.0, "high": 1.0}}},
            "space.lr: low -1.0 is not allowed: must be greater than 0",
        ),
        (
            {"space": {"momentum": {"low": 0.5, "high": 1.5}}},
            "space.momentum: high 1.5 is not allowed: must be less than 1",
        ),
        ({"space": {"epochs": {"low": 1.5, "high": 3}}}, "space.epochs: low 1.5 is not allowed"),
        (
            {"space": {"optimizer": ["sgd", "adam"]}},
            "space.optimizer: choice 'adam' is not allowed",
        ),
        (
            {"space": {"model_options.min_sise": [64]}},
            "no model takes this option (did you mean 'min_size'?)",
        ),
        ({"space": {"lr": {"low": 0.1, "hi": 1.0}}}, "space.lr.hi: not a key of a parameter"),
        ({"space": {"lr": {"low": 0.0, "high": 1.0, "log": True}}}, "a log scale needs low > 0"),
        ({"pruner": "sometimes"}, "pruner: must be one of median, hyperband, none"),
        (
            {"metric": "segm_APP"},
            "metric: 'segm_APP' is not a COCO metric (did you mean 'segm_AP'?)",
        ),
        ({"trails": 3}, "'trails' is not a key of a search file"),
    ],
)
def test_bad_search_is_one_line_before_any_trial(
    change, message, synthetic_root, tmp_path, monkeypatch, capsys
):
    search = write_search(tmp_path, synthetic_root)
    if isinstance(change, str):
        search.write_text(change)
    else:
        data = yaml.safe_load(search.read_text())
        search.write_text(yaml.safe_dump({**data, **change}))
    code, _, err = run_main(monkeypatch, capsys, "tune", search, "--out", tmp_path / "study")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"detfit: error: {search}: ") and message in err
    assert not (tmp_path / "study").exists()  # nothing started


def test_a_folder_holding_another_study_is_refused(
    study, synthetic_root, tmp_path, monkeypatch, capsys
):
    _, study_dir = study
    before = sorted(p.name for p in (study_dir / "trials").iterdir())
    other = write_search(tmp_path, synthetic_root, space={"lr": {"low": 0.001, "high": 0.01}})
    code, _, err = run_main(monkeypatch, capsys, "tune", other, "--out", study_dir)
    assert code == 2 and err.count("\n") == 1
    assert f"{study_dir}: holds another study (its space differs)" in err
    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("epoch\n1\n")
    code, _, err = run_main(monkeypatch, capsys, "tune", other, "--out", run_dir)
    assert code == 2 and "holds files but no study.yaml: not a study folder" in err
    assert sorted(p.name for p in (study_dir / "trials").iterdir()) == before


def test_missing_optuna_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(DetfitError) as info:
        optuna_module()
    assert str(info.value) == "detfit tune needs the optuna package: pip install 'detfit[tune]'"


def test_time_is_a_duration_as_train_takes_it(synthetic_root, tmp_path, monkeypatch, capsys):
    """--time means the same in tune as in train (30m, 1.5h, 900s); anything else is one line."""
    search = write_search(tmp_path, synthetic_root)
    code, _, err = run_main(
        monkeypatch, capsys, "tune", search, "--out", tmp_path / "study", "--time", "2 hours"
    )
    assert code == 2 and err.count("\n") == 1
    assert "--time 2 hours: must be a duration such as 30m, 1.5h or 900s" in err
    assert not (tmp_path / "study").exists()
