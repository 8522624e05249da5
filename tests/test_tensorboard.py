"""``logger: tensorboard``: the events, read back with TensorBoard's own EventAccumulator, hold
the values logged (per step: losses and lr; per epoch: the metrics row's COCO numbers, per-class
AP, validation losses; predictions as images); without the package, one line names the extra."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from conftest import run_config
from detfit.config import SettingsError, TrainConfig
from detfit.engine import Trainer
from detfit.engine.tensorboard import TensorBoardLogger, summary_writer_class
from detfit.errors import DetfitError
from detfit.eval.coco import STAT_NAMES
from detfit.plots.gallery import GAP, TENSORBOARD_PIXELS

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


@pytest.fixture(scope="module")
def events(plotted_run):
    accumulator = EventAccumulator(
        str(plotted_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    accumulator.Reload()
    return accumulator


def scalars(events, tag) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def test_epoch_scalars_are_the_metrics_rows(events, plotted_run):
    rows = json.loads((plotted_run / "metrics.json").read_text())
    ends = scalars(events, "epoch")  # global step at each epoch's end -> epoch number
    assert list(ends.values()) == [row["epoch"] for row in rows]
    for step, row in zip(ends, rows):
        for iou_type in ("bbox", "segm"):
            for name in STAT_NAMES:
                logged = scalars(events, f"{iou_type}/{name}")[step]
                assert logged == pytest.approx(row[f"{iou_type}_{name}"], abs=1e-7)
            logged = scalars(events, f"{iou_type}_AP_per_class/person")[step]
            assert logged == pytest.approx(row[f"{iou_type}_AP/person"], abs=1e-7)
        for key in (k for k in row if k.startswith("val_")):
            logged = scalars(events, key.replace("val_", "val/", 1))[step]
            assert logged == pytest.approx(row[key], rel=1e-6)


def test_step_scalars_average_to_the_epoch_losses(events, plotted_run):
    rows = json.loads((plotted_run / "metrics.json").read_text())
    ends = list(scalars(events, "epoch"))
    losses = scalars(events, "train/loss")
    assert sorted(losses) == list(range(1, ends[-1] + 1))  # every step, numbered from 1
    start = 0
    for end, row in zip(ends, rows):
        epoch = [losses[s] for s in range(start + 1, end + 1)]
        assert np.mean(epoch) == pytest.approx(row["train_loss"], rel=1e-6)
        mask = [scalars(events, "train/loss_mask")[s] for s in range(start + 1, end + 1)]
        assert np.mean(mask) == pytest.approx(row["train_loss_mask"], rel=1e-6)
        assert scalars(events, "train/lr")[end] == pytest.approx(row["train_lr"], rel=1e-6)
        start = end


def test_prediction_images_every_epoch(events, plotted_run):
    tags = [t for t in events.Tags()["images"] if t.startswith("predictions/")]
    assert len(tags) == 3  # the 3 test images (at most 4 are shown)
    ends = list(scalars(events, "epoch"))
    for tag in tags:
        images = events.Images(tag)
        assert [im.step for im in images] == ends
        for im in images:  # ground truth | gap | predictions, each within the size cap
            assert im.width <= 2 * TENSORBOARD_PIXELS[0] + GAP
            assert im.height <= TENSORBOARD_PIXELS[1]
            assert (im.width - GAP) % 2 == 0  # two halves of one width


def test_a_resumed_run_continues_the_curves(plotted_run, tmp_path):
    """Points logged after the checkpoint (here: a fake step past it, as a run killed between
    checkpoints leaves) are dropped; the run's own points, up to its checkpoint, are kept."""
    run = tmp_path / "run"
    shutil.copytree(plotted_run, run, ignore=shutil.ignore_patterns("eval-*"))
    end = int(max(scalars(EventAccumulator(str(run / "tensorboard")).Reload(), "epoch")))
    writer = summary_writer_class()(str(run / "tensorboard"))
    writer.add_scalar("train/loss", 123.0, end + 1)  # logged, then killed before a checkpoint
    writer.close()
    Trainer(resume=run, overrides={"epochs": 3}, progress=False, log=lambda s: None).fit()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    steps = [step for step, _ in losses]
    assert steps == sorted(set(steps)) and steps[0] == 1  # every step once, in order
    assert 123.0 not in [value for _, value in losses]
    ends = scalars(events, "epoch")
    assert list(ends.values()) == [1, 2, 3] and list(ends)[1] == end


def test_rank_zero_alone_writes():
    assert TensorBoardLogger.main_process_only


def test_missing_package_is_one_line_naming_the_extra(monkeypatch, synthetic_root, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(DetfitError) as info:
        summary_writer_class()
    assert str(info.value) == (
        "logger: tensorboard needs the tensorboard package: pip install 'detfit[tensorboard]'"
    )
    cfg = run_config(synthetic_root, tmp_path / "run").replace(logger="tensorboard")
    with pytest.raises(DetfitError, match=r"detfit\[tensorboard\]"):
        Trainer(cfg, progress=False, log=lambda s: None).fit()
    assert not (tmp_path / "run").exists()  # refused before a run folder is made
    with pytest.raises(SettingsError, match="logger='wandb'"):
        TrainConfig(logger="wandb")
