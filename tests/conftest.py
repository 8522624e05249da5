"""Shared fixtures: synthetic Penn-Fudan-shaped data made by the tests, and the real set when present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from detfit.config import TrainConfig
from detfit.data.synthetic import make_pennfudan

REPO = Path(__file__).resolve().parents[1]
REAL_PENNFUDAN = REPO.parent / "shared" / "data" / "PennFudanPed"
TINY = {"min_size": 64, "max_size": 96}  # model options that keep every test fast
# Situation B Mask R-CNN options for engine tests: thin heads, few proposals.
SMALL = {
    **TINY,
    "fpn_channels": 32,
    "mask_head_channels": 32,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
}
# Few proposals and detections: an untrained model otherwise runs its heads on 1000 RoIs/image.
FAST_EVAL = {
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20,
    "box_detections_per_img": 5,
}


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``detfit ARGS`` through the console entry point, in this process."""
    from detfit.cli import main

    monkeypatch.setattr(sys, "argv", ["detfit", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def run_config(synthetic_root: Path, out: Path) -> TrainConfig:
    """Two short epochs of a SMALL situation B Mask R-CNN on synthetic data, on the CPU."""
    return TrainConfig(
        model="maskrcnn_mobilenet_v2_fpn",
        weights=None,
        weights_backbone=None,
        model_options=dict(SMALL),
        data_root=str(synthetic_root),
        num_test=3,
        epochs=2,
        batch_size=2,
        workers=0,
        out=str(out),
        print_freq=1,
        threads=1,
        plots=False,  # drawing costs about a second an epoch; test_plots.py turns it on
    )


def fit_until_second_evaluation(cfg) -> None:
    """``fit(cfg)`` "crashing" in epoch 2's evaluation (a callback raising in on_evaluation, before
    the epoch's checkpoint): leaves a run folder whose last.pt ends epoch 1."""
    from detfit.engine import Callback, fit

    class Crashed(Exception):
        pass

    class CrashOnSecondEvaluation(Callback):
        def __init__(self) -> None:
            self.evaluations = 0

        def on_evaluation(self, trainer, result) -> None:
            self.evaluations += 1
            if self.evaluations == 2:
                raise Crashed

    with pytest.raises(Crashed):
        fit(cfg, progress=False, log=lambda s: None, callbacks=[CrashOnSecondEvaluation()])


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by per-op overhead: one thread is faster, and steadier on 2 cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Eight synthetic images with instance-id masks, laid out as PennFudanPed/."""
    return make_pennfudan(tmp_path_factory.mktemp("synthetic"), num_images=8)


@pytest.fixture(scope="session")
def plotted_run(synthetic_root, tmp_path_factory) -> Path:
    """Two epochs of ``run_config`` with every picture: plots, validation loss, TensorBoard."""
    from detfit.engine import fit

    cfg = run_config(synthetic_root, tmp_path_factory.mktemp("plotted") / "run")
    cfg.plots, cfg.val_loss, cfg.logger = True, True, "tensorboard"
    return fit(cfg, progress=False, log=lambda s: None)


@pytest.fixture(scope="session")
def real_root() -> Path:
    if not (REAL_PENNFUDAN / "PNGImages").is_dir():
        pytest.skip("real Penn-Fudan not present (../shared/data/PennFudanPed)")
    return REAL_PENNFUDAN


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torchvision weight cache, so nothing pretrained is found unless a test puts it there."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    return home / "hub" / "checkpoints"
