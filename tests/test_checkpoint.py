"""The checkpoint format's one home: which file a run folder means to every command that reads a
model (eval, predict and serve, export, export --strip), and what ``load_model`` returns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST_EVAL, SMALL, run_config
from detfit.checkpoint import (
    ResumeState,
    best_payload,
    load_checkpoint,
    load_model,
    model_info,
    resume_state,
    save_checkpoint,
    strip_checkpoint,
)
from detfit.errors import DetfitError
from detfit.eval.saved import evaluate_checkpoint
from detfit.export import export_model
from detfit.models import build_model
from detfit.predict.backends import load_backend

MODEL = "maskrcnn_mobilenet_v2_fpn"
OPTIONS = {**SMALL, **FAST_EVAL}
CLASSES = ["__background__", "person"]


def checkpoint(path: Path, cfg, seed: int, **changes) -> Path:
    """A checkpoint of a randomly initialised tiny model (``seed`` decides its weights)."""
    torch.manual_seed(seed)
    model = build_model(MODEL, len(CLASSES), weights=None, weights_backbone=None, **OPTIONS)
    info = model_info(MODEL, len(CLASSES), CLASSES, OPTIONS, model)
    ckpt = {"model": model.state_dict(), "model_info": info, "config": cfg.to_dict()}
    ckpt["optimizer"] = {"state": {"moments": torch.zeros(1000, 100)}}  # only last.pt needs it
    save_checkpoint(path, {**ckpt, **changes})
    return path


@pytest.fixture(scope="module")
def run_folder(synthetic_root, tmp_path_factory) -> Path:
    """A run folder whose best.pt and last.pt hold different weights; last.pt's model_info does
    not even build, so any command that read it would stop with an error."""
    run = tmp_path_factory.mktemp("run")
    cfg = run_config(synthetic_root, run)
    cfg.model_options = dict(OPTIONS)
    checkpoint(run / "best.pt", cfg, seed=0)
    info = load_checkpoint(run / "best.pt")["model_info"]
    broken = {**info, "options": {**info["options"], "fpn_channels": "wide"}}
    checkpoint(run / "last.pt", cfg, seed=1, model_info=broken)
    return run


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_model_of_a_run_folder_is_its_best_pt(run_folder):
    loaded, best = load_model(run_folder), load_model(run_folder / "best.pt")
    assert loaded.path == best.path == run_folder / "best.pt"
    assert same_weights(weights(loaded.model), weights(best.model))
    assert not loaded.model.training  # ready for inference
    assert loaded.info == best.info and loaded.classes == CLASSES
    assert loaded.config == load_checkpoint(run_folder / "best.pt")["config"]
    # last.pt is not what it read: that one does not even build
    with pytest.raises(DetfitError, match="last.pt: its model_info does not build"):
        load_model(run_folder / "last.pt")


def test_a_run_folder_without_best_pt_means_its_last_pt(run_folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_folder / "best.pt", run / "last.pt")
    assert load_model(run).path == run / "last.pt"
    with pytest.raises(DetfitError, match="no best.pt or last.pt"):
        load_model(tmp_path)  # a folder with neither


def test_every_command_reads_the_same_file_of_a_run_folder(run_folder, tmp_path):
    best = load_model(run_folder / "best.pt")
    image = torch.rand(3, 80, 96)
    with torch.inference_mode():
        expected = best.model([image])[0]

    # predict (and serve, which loads through it): the same file, the same detections
    backend = load_backend(run_folder, "cpu")
    assert backend.path == run_folder / "best.pt" and backend.info == best.info
    predicted = backend([image])[0]
    assert predicted.keys() == expected.keys()
    assert all(torch.equal(predicted[k], expected[k]) for k in expected)

    # export --strip: best.pt's weights, without the optimizer state
    out, before, after = strip_checkpoint(run_folder, tmp_path / "small.pt")
    small = load_checkpoint(out)
    assert "optimizer" not in small and after < before == (run_folder / "best.pt").stat().st_size
    assert same_weights(small["model"], weights(best.model))

    # export: named after best.pt, and it runs best.pt's model
    exported, report = export_model(
        run_folder, "torchscript", out=tmp_path / "best.ts.pt", check=False, log=lambda s: None
    )
    assert exported == tmp_path / "best.ts.pt" and report == []
    scripted = load_backend(exported, "cpu")([image])[0]
    assert torch.allclose(scripted["boxes"], expected["boxes"], atol=1e-3)

    # eval: the numbers of best.pt itself
    quiet = {"device": "cpu", "progress": False, "verbose": False, "log": lambda s: None}
    of_folder = evaluate_checkpoint(run_folder, **quiet)
    of_best = evaluate_checkpoint(run_folder / "best.pt", **quiet)
    assert of_folder.stats == of_best.stats
    assert set(of_folder.stats) == {"bbox", "segm"} and of_folder.num_images == 3


def test_resume_state_round_trips_and_refuses_other_formats(tmp_path):
    """What the trainer saves it reads back field for field (``epoch`` from 1 on disk, from 0 in
    memory); a last.pt of another format (no ``iteration``, ``callbacks``, ``seconds``) is one
    line naming what it lacks; best.pt keeps no optimizer."""
    weights = {"w": torch.arange(3.0)}
    state = ResumeState(
        model=weights, model_info={"name": MODEL}, config={"epochs": 4}, optimizer={"o": 1},
        scheduler={"s": 2}, history=[{"epoch": 1}, {"epoch": 2}], epoch=2, iteration=5,
        evaluated=False, global_step=19, iters_per_epoch=7, world_size=2, seconds=81.5,
        metric_key="segm_AP", rng=[{"seed": 1}, {"seed": 2}], callbacks={"EMA": {"updates": 19}},
        stopped=None, train_model={"w": torch.zeros(3)},
    )  # fmt: skip
    save_checkpoint(tmp_path / "last.pt", state.payload())
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    back = resume_state(tmp_path / "last.pt")
    assert torch.equal(back.model["w"], weights["w"]) and torch.equal(
        back.train_model["w"], 0 * weights["w"]
    )
    for name in ("epoch", "iteration", "evaluated", "global_step", "world_size", "seconds", "rng"):
        assert getattr(back, name) == getattr(state, name), name
    assert back.done == 2 and back.callbacks == {"EMA": {"updates": 19}}
    best = best_payload(state)
    assert "optimizer" not in best and "rng" not in best and best["epoch"] == 3

    old = {
        k: v for k, v in state.payload().items() if k not in ("iteration", "callbacks", "seconds")
    }
    save_checkpoint(tmp_path / "old.pt", old)
    with pytest.raises(DetfitError) as info:
        resume_state(tmp_path / "old.pt")
    assert str(info.value) == (
        f"{tmp_path / 'old.pt'}: written by another version of detfit (no iteration, seconds, "
        f"callbacks), so it cannot be resumed; start a new run from its weights with --weights "
        f"{tmp_path / 'old.pt'}"
    )
    save_checkpoint(tmp_path / "weights.pt", {"model": weights, "model_info": {"name": MODEL}})
    with pytest.raises(
        DetfitError, match="weights-only checkpoint .no optimizer, scheduler, history, epoch"
    ):
        resume_state(tmp_path / "weights.pt")
