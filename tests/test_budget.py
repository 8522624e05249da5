"""time_budget and patience: the plan, the stop in time when the machine slows down, resume
counting the time already spent, and patience stopping where the history says.

The trainer's clock is a virtual one here, advanced by the steps (1 s each) and the evaluations
(1 s per image): the plans and stops are exact numbers, whatever else runs on the machine.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import make_pennfudan, run_main
from detfit.checkpoint import load_checkpoint
from detfit.config import SettingsError, TrainConfig, parse_duration
from detfit.engine import Callback, Trainer
from detfit.engine.budget import TimeBudget
from detfit.engine.callbacks import evaluations_since_best
from detfit.errors import DetfitError, Interrupted
from jobs.train_job import VirtualTimeTrainer  # evaluations take 1 s per image on its clock
from test_trainer import SignalAt, tiny


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Steps(Callback):
    """Each training step takes 1 s, those of epoch ``slow_epoch`` (0-based) ``slow`` s more;
    the budget's probe times 2 iterations (epochs here have 3)."""

    def __init__(self, clock: VirtualClock, slow_epoch: int = -1, slow: float = 0.0) -> None:
        self.clock, self.slow_epoch, self.slow = clock, slow_epoch, slow

    def on_train_start(self, trainer):
        if trainer.planner is not None:
            trainer.planner.probe_iters = 2

    def on_step_end(self, trainer, result):
        self.clock.now += 1.0 + (self.slow if trainer.epoch == self.slow_epoch else 0.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_pennfudan(tmp_path_factory.mktemp("budget"), num_images=9, size=(48, 80))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def budget_fit(cfg, clock, steps=None, callbacks=(), resume=None) -> tuple[Path, list[str]]:
    logs: list[str] = []
    callbacks = [steps or Steps(clock), *callbacks]
    common = {"progress": False, "log": logs.append, "callbacks": callbacks}
    if resume is not None:
        trainer = VirtualTimeTrainer(clock, resume=resume, **common)
    else:
        trainer = VirtualTimeTrainer(clock, cfg, **common)
    return trainer.fit(), logs


def budget_config(root: Path, out: Path, budget: str, **changes) -> TrainConfig:
    """3 iterations and 3 evaluated images per epoch: 6 virtual seconds an epoch."""
    return tiny(
        root, out, time_budget=budget, epochs=5, lr_schedule="cosine", warmup_iters=1, **changes
    )


def test_durations_and_metric_names_are_checked_when_parsed():
    assert parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400
    assert parse_duration("90s") == parse_duration("90") == 90
    with pytest.raises(SettingsError, match=r"time_budget='half an hour': must be a duration"):
        TrainConfig(time_budget="half an hour")
    with pytest.raises(SettingsError, match=r"time_budget='-5m': must be a positive duration"):
        TrainConfig(time_budget="-5m")
    with pytest.raises(
        SettingsError, match=r"best_metric='segm_AP51': must be .*AR100.*did you mean 'segm_AP"
    ):
        TrainConfig(best_metric="segm_AP51")
    assert TrainConfig(best_metric="segm_ARl").best_metric == "segm_ARl"


def test_the_plan_counts_epochs_that_fit_and_caps_at_epochs():
    budget = TimeBudget(seconds=100, cap=50, planned=50, seconds_per_iter=1, eval_seconds=5)
    # 10 s spent, 4 s to finish the current epoch, 20 s an epoch (x 1.1): 86 / 22 -> 3 more
    assert "4 epochs would fit" not in budget.plan(10, 1, 4, 20)
    assert budget.planned == 4
    budget.cap = 2
    assert budget.plan(10, 1, 4, 20).endswith("4 epochs would fit, the epochs setting caps it at 2")
    assert budget.planned == 2
    budget.plan(99, 3, 0, 20)  # out of time: never fewer than the epochs done
    assert budget.planned == 3
    assert budget.must_stop_now(94.5) and not budget.must_stop_now(94.4)  # 5 s x 1.1 to evaluate


def test_a_budget_for_two_epochs_plans_two_and_ends_inside_it(root, tmp_path, clock):
    # probe: steps 1-2 (1 s each), 2 of 3 images evaluated (2 s: 3 s for the split), so at 4 s
    # epoch 1 needs 4 s more and an epoch costs 6 s: 20 s hold 2 epochs (1 + floor(12 / 6.6))
    run, logs = budget_fit(budget_config(root, tmp_path / "run", "20s"), clock)
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 2 and clock.now <= 20
    assert any(
        line.startswith("time budget 20s: planned 2 epochs (1.00 s per iteration x 3 + 3 s "
                        "evaluation; 16 s left, 6 s per epoch); the learning-rate schedule ends")
        for line in logs
    ), logs  # fmt: skip
    assert logs[-1] == "time budget 20s: 2 epochs trained and evaluated in 14 s"
    assert history[-1]["train_lr"] == 0.0  # the cosine schedule ended with the planned epochs
    assert history[-1]["minutes"] * 60 == pytest.approx(14, abs=0.05)
    assert load_checkpoint(run)["budget"]["planned"] == 2
    with pytest.raises(DetfitError, match="has already trained 2 epoch"):
        Trainer(resume=run).fit()
    # a larger budget on resume: 14 s spent, 26 s left, 6 s an epoch (x 1.1): 3 more
    clock.now = 0.0
    logs = []
    trainer = VirtualTimeTrainer(
        clock, resume=run, overrides={"time_budget": "40s"}, progress=False, log=logs.append,
        callbacks=[Steps(clock)],
    )  # fmt: skip
    trainer.fit()
    assert "time budget 40s: planned 5 epochs (26 s left, 6 s per epoch)" in logs
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 5 and history[-1]["minutes"] * 60 == pytest.approx(32, abs=0.05)


def test_a_slowed_epoch_still_stops_in_time_with_an_evaluated_best(root, tmp_path, clock):
    cfg = budget_config(root, tmp_path / "run", "30s")
    # the probe plans 4 epochs; epoch 1 really costs 8 s: 3; epoch 2's steps take 7 s each
    run, logs = budget_fit(cfg, clock, Steps(clock, slow_epoch=1, slow=6.0))
    history = json.loads((run / "metrics.json").read_text())
    assert clock.now <= 30
    assert len(history) == 2 and history[-1]["minutes"] * 60 <= 30
    stopped = load_checkpoint(run)
    assert (stopped["epoch"], stopped["iteration"], stopped["evaluated"]) == (2, 2, True)
    assert "leaves only the time to evaluate, at iteration 2/3" in stopped["stopped"]
    assert any(line.startswith("time budget 30s: planned 4 epochs") for line in logs)
    assert "time budget: now 3 epochs instead of 4 (22 s left, 8 s per epoch)" in logs
    assert logs[-1].startswith("stopping after epoch 2/3: the time budget (30s) leaves only")
    best = load_checkpoint(run / "best.pt")
    assert best["history"][-1]["segm_AP"] == max(r["segm_AP"] for r in history)


def test_resume_counts_the_time_already_spent(root, tmp_path, clock):
    run = tmp_path / "run"
    signal_at = SignalAt(4, signal.SIGTERM)
    with pytest.raises(Interrupted):
        budget_fit(budget_config(root, run, "20s"), clock, callbacks=[signal_at])
    spent = load_checkpoint(run)["seconds"]
    assert spent == pytest.approx(clock.now) == 10  # stopped after step 5
    clock.now = 0.0  # another process: its clock starts anew
    budget_fit(None, clock, resume=run)
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 2  # as without the stop
    assert history[-1]["minutes"] * 60 == pytest.approx(spent + clock.now, abs=0.05)
    assert spent + clock.now == 14


def test_evaluations_since_best():
    rows = [{"m": v} for v in (0.1, 0.3, 0.2, 0.3, 0.25)]
    assert evaluations_since_best(rows, "m") == 3  # an equal value does not improve
    assert evaluations_since_best(rows[:2], "m") == 0


def test_patience_stops_where_the_history_says(root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = tiny(root, out, epochs=6, max_iters_per_epoch=1, patience=1, best_metric="bbox_AP50")
    cfg.save(tmp_path / "settings.yaml")
    code, stdout, err = run_main(
        monkeypatch,
        capsys,
        "train",
        "--config",
        tmp_path / "settings.yaml",
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err
    history = json.loads((out / "metrics.json").read_text())
    values = [row["bbox_AP50"] for row in history]
    first_flat = next(i for i in range(1, 6) if values[i] <= max(values[:i]))
    assert len(history) == first_flat + 1 < 6
    assert (
        f"stopping after epoch {first_flat + 1}/6: patience 1: bbox_AP50 has not beaten" in stdout
    )
    best = load_checkpoint(out / "best.pt")
    assert best["history"][-1]["bbox_AP50"] == max(values)
    code, _, err = run_main(monkeypatch, capsys, "train", "--resume", out, "--quiet")
    assert code == 2 and "has already trained" in err and "patience 1" in err


def test_best_metric_must_be_scored_by_the_model(root, tmp_path):
    cfg = tiny(root, tmp_path / "run", best_metric="keypoints_AP")
    with pytest.raises(DetfitError, match="best_metric=keypoints_AP: .* is scored on bbox, segm"):
        Trainer(cfg, progress=False, log=lambda s: None).fit()


def test_a_recipes_epochs_do_not_cap_a_budget_but_the_users_do():
    from detfit.config import BUDGET_EPOCHS, recipe_config

    assert recipe_config("tutorial").epochs == 10  # no budget: the recipe's epochs
    assert recipe_config("tutorial", time_budget="2h").epochs == BUDGET_EPOCHS
    assert recipe_config("cpu", time_budget="2h", epochs=3).epochs == 3  # the user's cap holds
    # the CPU recipe's own 30 minutes plan its epochs; without them, its epochs are back
    assert recipe_config("cpu").time_budget == "30m"
    assert recipe_config("cpu").epochs == BUDGET_EPOCHS
    assert recipe_config("cpu", uncap=False).epochs == 22  # what --set time_budget=null runs


def test_train_time_flag_is_not_capped_by_the_recipes_epochs(root, tmp_path, monkeypatch, capsys):
    """``detfit train --recipe cpu --time``: config.yaml records the budget's cap, not the
    recipe's epochs; ``--epochs`` given as well is the cap. A 1 s budget trains one epoch."""
    import yaml

    from detfit.config import BUDGET_EPOCHS

    small = [f"--set=model_options.{k}={v}" for k, v in {"min_size": 64, "max_size": 96}.items()]
    common = [
        "train", "--recipe", "cpu", "--data-root", root, "--time", "1s",
        "--set", "weights_backbone=null", "--set", "num_test=2", "--set", "workers=0",
        "--set", "max_iters_per_epoch=1", "--set", "threads=1", "--set", "plots=false", "--quiet",
        *small,
    ]  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, *common, "--out", tmp_path / "a")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["epochs"] == BUDGET_EPOCHS
    assert len(json.loads((tmp_path / "a" / "metrics.json").read_text())) == 1
    code, out, err = run_main(
        monkeypatch, capsys, *common, "--epochs", "2", "--out", tmp_path / "b"
    )
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["epochs"] == 2
    # --set time_budget=null: the recipe's own epochs again (here 1), not the budget's cap
    from detfit.config import RECIPES

    monkeypatch.setitem(RECIPES["cpu"], "epochs", 1)
    no_budget = list(common)
    no_budget[no_budget.index("--time") : no_budget.index("--time") + 2] = []
    code, out, err = run_main(
        monkeypatch, capsys, *no_budget, "--set", "time_budget=null", "--out", tmp_path / "c"
    )
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["time_budget"] is None
