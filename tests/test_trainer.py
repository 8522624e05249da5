"""The Trainer in one process: events and callbacks, mid-epoch checkpoints, SIGTERM and exact
resume, run folders that are never overwritten, and the samplers behind resumable epochs."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_pennfudan, run_config, run_main
from detfit.checkpoint import load_checkpoint
from detfit.config import TrainConfig
from detfit.data.sampling import EpochBatches, PerItemSeed, ShardBatches
from detfit.engine import Callback, Trainer
from detfit.errors import DetfitError, Interrupted


@pytest.fixture(scope="module")
def landscape_root(tmp_path_factory) -> Path:
    """Images wider than high: every resized batch pads to the same height, so RoIAlign infers
    the same scales whichever batch a (resumed) model sees first (see test_engine)."""
    return make_pennfudan(tmp_path_factory.mktemp("landscape"), num_images=9, size=(48, 80))


def tiny(root: Path, out: Path, **changes) -> TrainConfig:
    """3 epochs x 3 batches of the SMALL Mask R-CNN (6 train, 3 test images), one thread."""
    settings = {**run_config(root, out).to_dict(), "epochs": 3, "num_test": 3}
    settings.update(aspect_ratio_group_factor=-1, **changes)
    return TrainConfig.from_dict(settings)


def quiet_fit(cfg, **kwargs) -> Path:
    return Trainer(cfg, progress=False, log=lambda s: None, **kwargs).fit()


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_train_start(self, trainer):
        self.events.append("train_start")

    def on_epoch_start(self, trainer):
        self.events.append(f"epoch_start {trainer.epoch}")

    def on_step_end(self, trainer, result):
        self.events.append(f"step {trainer.epoch}.{trainer.iteration}")

    def on_evaluation(self, trainer, result):
        self.events.append(f"evaluation {sorted(result.stats)}")

    def on_epoch_end(self, trainer, row):
        self.events.append(f"epoch_end {row['epoch']}")

    def on_checkpoint(self, trainer, path):
        self.events.append(f"checkpoint {path.name}")

    def on_interrupt(self, trainer, reason):
        self.events.append(f"interrupt {reason}")

    def on_train_end(self, trainer):
        self.events.append("train_end")


class SignalAt(Callback):
    """Sends this process a real SIGTERM after global step ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_end(self, trainer, result):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_events_fire_in_order_and_checkpoints_every_n_iterations(landscape_root, tmp_path):
    cfg = tiny(landscape_root, tmp_path / "run", epochs=2, checkpoint_every_iters=2)
    recorder = Recorder()
    quiet_fit(cfg, callbacks=[recorder])
    # global steps 2 and 4 are mid-epoch saves (the Checkpointer runs before user callbacks);
    # step 6 ends epoch 2, whose own save follows its evaluation
    epoch0 = [
        "epoch_start 0",
        "step 0.1",
        "checkpoint last.pt",
        "step 0.2",
        "step 0.3",
        "evaluation ['bbox', 'segm']",
        "checkpoint best.pt",  # best.pt before last.pt whenever the metric improves (epoch 1 does)
        "checkpoint last.pt",
    ]
    epoch1 = [
        "epoch_start 1",
        "checkpoint last.pt",
        "step 1.1",
        "step 1.2",
        "step 1.3",
        "evaluation ['bbox', 'segm']",
        "checkpoint last.pt",
    ]
    events = recorder.events
    assert events[0] == "train_start" and events[-1] == "train_end"
    assert events[1 : 1 + len(epoch0)] == epoch0
    assert events[1 + len(epoch0)] == "epoch_end 1"
    rest = events[2 + len(epoch0) :]
    assert rest[: len(epoch1) - 1] == epoch1[:-1]
    assert rest[len(epoch1) - 1 :] in (
        ["checkpoint best.pt", "checkpoint last.pt", "epoch_end 2", "train_end"],
        ["checkpoint last.pt", "epoch_end 2", "train_end"],
    )


def early_stopping_from_readme() -> type:
    """The documentation's ten-line callback example (docs/engine.md), executed as printed."""
    text = (REPO / "docs" / "engine.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "EarlyStopping" in b)
    code = block.split("\nTrainer(")[0]
    namespace: dict = {}
    exec(code, namespace)
    return namespace["EarlyStopping"]


def test_the_readmes_early_stopping_callback_stops_training(landscape_root, tmp_path):
    early_stopping = early_stopping_from_readme()
    cfg = tiny(landscape_root, tmp_path / "run", epochs=6, max_iters_per_epoch=1)
    run = quiet_fit(cfg, callbacks=[early_stopping(patience=1)])
    history = json.loads((run / "metrics.json").read_text())
    aps = [row["segm_AP"] for row in history]
    # stops at the first epoch that does not beat the best before it
    first_flat = next(i for i in range(1, len(aps)) if aps[i] <= max(aps[:i]))
    assert len(history) == first_flat + 1 < 6
    assert load_checkpoint(run)["epoch"] == first_flat + 1


@pytest.fixture(scope="module")
def uninterrupted(landscape_root, tmp_path_factory):
    run = quiet_fit(tiny(landscape_root, tmp_path_factory.mktemp("a") / "run"))
    return load_checkpoint(run / "last.pt")


def assert_same_run(a: dict, b: dict) -> None:
    assert list(a["model"]) == list(b["model"])
    diff = max(
        (a["model"][k].double() - b["model"][k].double()).abs().max().item()
        for k in a["model"]
        if a["model"][k].is_floating_point()
    )
    assert diff == 0.0
    for slot_a, slot_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(slot_a["momentum_buffer"], slot_b["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    timing = ("minutes", "seconds", "eval_seconds", "peak_rss")
    strip = lambda rows: [  # noqa: E731
        {k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows
    ]
    assert strip(a["history"]) == strip(b["history"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_saves_and_the_resumed_run_is_exact(
    signum, landscape_root, tmp_path, uninterrupted
):
    run = tmp_path / "run"
    cfg = tiny(landscape_root, run)
    recorder = Recorder()
    with pytest.raises(Interrupted) as info:
        quiet_fit(cfg, callbacks=[SignalAt(4, signum), recorder])
    # the step after the signal is finished (all ranks agree in that step), then it stops
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"stopped by {name} at epoch 2/3, iteration 2/3; {run / 'last.pt'} holds it; "
        f"resume with: detfit train --resume {run}"
    )
    assert info.value.exit_code == 128 + signum
    assert recorder.events[-2:] == ["checkpoint last.pt", f"interrupt {name}"]
    stopped = load_checkpoint(run)
    assert (stopped["epoch"], stopped["iteration"], stopped["evaluated"]) == (2, 2, False)
    assert stopped["global_step"] == 5 and len(stopped["history"]) == 1
    assert len(json.loads((run / "metrics.json").read_text())) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    logs: list[str] = []
    Trainer(resume=run, progress=False, log=logs.append).fit()
    assert f"resuming {run} at epoch 2/3, iteration 2/3 (of 3 epochs)" in logs
    assert_same_run(uninterrupted, load_checkpoint(run))
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2, 3]


def test_resume_from_a_periodic_checkpoint_is_exact(landscape_root, tmp_path, uninterrupted):
    """A kill between saves loses the steps since the last one, and nothing else."""
    run = tmp_path / "run"

    class Crash(Callback):
        def on_checkpoint(self, trainer, path):
            if trainer.global_step == 7:
                raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        quiet_fit(tiny(landscape_root, run, checkpoint_every_iters=1), callbacks=[Crash()])
    assert load_checkpoint(run)["global_step"] == 7
    Trainer(resume=run, progress=False, log=lambda s: None).fit()
    assert_same_run(uninterrupted, load_checkpoint(run))


def test_resume_extends_a_finished_run_and_refuses_other_changes(landscape_root, tmp_path):
    run = quiet_fit(tiny(landscape_root, tmp_path / "run", epochs=1, max_iters_per_epoch=1))
    with pytest.raises(DetfitError, match=r"already trained 1 epoch\(s\); give --epochs N"):
        Trainer(resume=run).fit()
    with pytest.raises(DetfitError, match="batch_size, lr cannot change when a run continues"):
        Trainer(resume=run, overrides={"lr": 0.1, "batch_size": 4, "epochs": 2}).fit()
    Trainer(resume=run, overrides={"epochs": 2}, progress=False, log=lambda s: None).fit()
    ckpt = load_checkpoint(run)
    assert [r["epoch"] for r in ckpt["history"]] == [1, 2] and ckpt["config"]["epochs"] == 2


def test_an_elastic_restart_after_the_last_checkpoint_finishes_at_once(
    landscape_root, tmp_path, monkeypatch
):
    """torchrun restarts the group when a worker dies, even after the last epoch's checkpoint
    (during teardown): the restarted group must find the run complete, not fail on it."""
    cfg = tiny(landscape_root, tmp_path / "run", epochs=1, max_iters_per_epoch=1)
    run = quiet_fit(cfg)
    before = load_checkpoint(run)
    (run / "metrics.json").unlink()  # killed before the metrics files were rewritten
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    logs: list[str] = []
    recorder = Recorder()
    assert Trainer(cfg, callbacks=[recorder], progress=False, log=logs.append).fit() == run
    assert logs == [f"restart 1: {run} has finished all 1 epochs"]
    assert recorder.events == []  # nothing trained, evaluated or saved again
    after = load_checkpoint(run)
    assert after["global_step"] == before["global_step"] == 1
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [1]


def test_run_folders_are_never_overwritten(monkeypatch, capsys, landscape_root, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--recipe", "tutorial", "--model", "fasterrcnn_mobilenet_v2_fpn"]
    args += ["--weights", "none", "--weights-backbone", "none", "--data-root", landscape_root]
    args += ["--epochs", "1", "--workers", "0", "--quiet", "--set", "max_iters_per_epoch=1"]
    args += ["--set", "num_test=2", "--set", "model_options.min_size=64", "--out", out]
    args += ["--set", "plots=false"]
    code, stdout, _ = run_main(monkeypatch, capsys, *args)
    assert code is None or code == 0, stdout
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert err.strip() == (
        f"detfit: error: {out}: already holds a run; continue it with --resume {out}, or give "
        "--overwrite to start over in it"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a run's own config.yaml starts a new folder
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_main(
        monkeypatch, capsys, "train", "--config", out / "config.yaml", "--quiet"
    )
    assert code in (None, 0) and "done: runs/fasterrcnn_mobilenet_v2_fpn " in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # --overwrite starts over on purpose; a stale temporary file of a killed save goes
    stale = out / ".last.pt.k3j_9x2a.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, _, _ = run_main(monkeypatch, capsys, *args, "--overwrite")
    assert code in (None, 0) and not stale.exists()
    assert load_checkpoint(out)["history"][0]["epoch"] == 1


def test_resume_flags_are_applied_or_refused(monkeypatch, capsys, landscape_root, tmp_path):
    run = quiet_fit(tiny(landscape_root, tmp_path / "run", epochs=1, max_iters_per_epoch=1))
    code, _, err = run_main(monkeypatch, capsys, "train", "--resume", run, "--lr", "0.1")
    assert (
        code == 2 and "lr cannot change when a run continues" in err and len(err.splitlines()) == 1
    )
    code, _, err = run_main(monkeypatch, capsys, "train", "--resume", run, "--recipe", "cpu")
    assert code == 2 and "--config, --recipe and --overwrite do not apply" in err
    code, out, _ = run_main(
        monkeypatch, capsys, "train", "--resume", run, "--epochs", "2", "--quiet", "--workers", "0"
    )
    assert code in (None, 0) and f"done: {run}" in out
    assert len(load_checkpoint(run)["history"]) == 2


# ---------------------------------------------------------------- samplers


def test_epoch_batches_shard_the_set_evenly_and_resume_mid_epoch():
    groups = [i % 3 for i in range(11)]
    ranks = [EpochBatches(11, 2, seed=5, rank=r, world_size=2, group_ids=groups) for r in (0, 1)]
    for epoch in (0, 1):
        for b in ranks:
            b.set_epoch(epoch)
        batches = [list(b) for b in ranks]
        # the same number of steps on every rank, ceil(ceil(11 / 2) / 2), every batch full
        assert [len(b) for b in batches] == [3, 3] == [len(b) for b in ranks]
        assert all(len(batch) == 2 for rank in batches for batch in rank)
        seen = [i for rank in batches for batch in rank for i in batch]
        assert set(seen) == set(range(11))  # 12 slots: one item repeats to even the shards
    ranks[0].set_epoch(0)
    epoch0 = list(ranks[0])
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != epoch0  # reshuffled every epoch
    ranks[0].set_epoch(0, skip=2)
    assert list(ranks[0]) == epoch0[2:] and len(ranks[0]) == 1

    one = EpochBatches(11, 2, seed=5, group_ids=groups)
    one.set_epoch(0)
    items = [i for batch in one for i in batch]
    assert set(items) == set(range(11))
    for batch in one:  # one process keeps the references' batches of one group each
        assert len({groups[i] for i in batch}) == 1


def test_shard_batches_cover_every_item_once():
    shards = [list(ShardBatches(5, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert shards == [[[0, 1], [4]], [[2, 3]]]
    assert list(ShardBatches(5, 2)) == [[0, 1], [2, 3], [4]]


class Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(3)


def test_per_item_seeds_do_not_depend_on_the_callers_rng():
    items = PerItemSeed(Noisy(), seed=1)
    torch.manual_seed(0)
    first = [items[i] for i in range(4)]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    again = [items[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.manual_seed(0)
    items[0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    items.set_epoch(1)
    assert not torch.equal(items[0], first[0])


def test_a_recipes_options_adapt_to_the_model_and_the_data():
    from detfit.config import recipe_config
    from detfit.data.loaders import Datasets
    from detfit.models.policy import options_for_data

    crowded = Datasets(None, None, ["__background__", "a"], max_objects=101)
    logs: list[str] = []
    cfg = recipe_config("cpu", model="fasterrcnn_resnet50_fpn")
    options = options_for_data(cfg, crowded, logs.append)
    dropped = ("fpn_channels", "mask_head_channels", "mask_head_norm")
    assert not set(dropped) & set(options)
    assert options["box_detections_per_img"] == 100  # 2 x 101, capped at COCO's 100
    assert logs == [
        f"fasterrcnn_resnet50_fpn does not use the cpu recipe's {', '.join(dropped)}: ignored",
        "box_detections_per_img: the cpu recipe's 30 raised to 100 (a training image has 101 "
        "objects)",
    ]
    few = Datasets(None, None, ["__background__", "person"], max_objects=8)
    assert options_for_data(recipe_config("cpu"), few, logs.append)["box_detections_per_img"] == 30
    # a cap the user chose stays, however low
    mine = recipe_config("cpu", model_options={"box_detections_per_img": 5})
    assert options_for_data(mine, crowded, logs.append)["box_detections_per_img"] == 5
    with pytest.raises(DetfitError, match="does not take model option"):
        options_for_data(
            recipe_config("tutorial", model_options={"fpn_channels": 64}), crowded, logs.append
        )


def test_a_second_signal_aborts_at_once_but_a_forwarded_duplicate_does_not():
    from detfit.engine import interrupt

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job (CI), else Python's
    with interrupt.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the same Ctrl-C: ignored
        assert stop.requested and stop.name == "SIGINT"
        stop._first_at -= interrupt.SECOND_SIGNAL_AFTER_S  # a person's second Ctrl-C, later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) == before


def test_progress_bar_updates_loss_every_print_freq_iterations():
    """print_freq=3 over a 7-step epoch: the bar shows the loss after steps 3, 6 and the last
    (7), and never the losses of the steps between."""
    import io
    from types import SimpleNamespace

    from detfit.engine.callbacks import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(every=3, file=out)
    trainer = SimpleNamespace(
        iters_per_epoch=7,
        iteration=0,
        epoch_label=lambda: "epoch 1/1",
        meter=SimpleNamespace(mean_loss=0.0),
        optimizer=SimpleNamespace(param_groups=[{"lr": 0.01}]),
    )
    bar.on_epoch_start(trainer)
    for step in range(1, 8):
        trainer.iteration, trainer.meter.mean_loss = step, float(step)
        bar.on_step_end(trainer, None)
    shown = sorted(set(re.findall(r"loss=(\d)\.000", out.getvalue())))
    assert shown == ["3", "6", "7"]
    assert "7/7" in out.getvalue() and bar.bar is None  # closed at the epoch's end
