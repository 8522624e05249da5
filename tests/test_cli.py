"""The ``detfit`` command line: help, one-line errors with exit code 2, and train -> eval -> predict
on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import run_main
from detfit.checkpoint import load_checkpoint
from detfit.cli import app
from detfit.config import TrainConfig
from detfit.data.synthetic import make_pennfudan
from detfit.eval.coco import STAT_NAMES
from detfit.models import MODELS

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args], prog_name="detfit", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["train", "eval", "predict", "data", "models"]),
        (
            ["train"],
            [
                "--recipe",
                "--config",
                "--data-root",
                "--model",
                "--weights",
                "--weights-backbone",
                "--epochs",
                "--lr",
                "--out",
                "--resume",
                "--set",
            ],
        ),
        (["eval"], ["checkpoint", "--data-root", "--device", "--json"]),
        (
            ["predict"],
            [
                "MODEL",
                "INPUT",
                "--out",
                "--score-threshold",
                "--classes",
                "--coco-json",
                "--device",
            ],
        ),
        (["export"], ["--format", "--file", "--opset", "--images", "--no-check", "--strip"]),
        (["data", "pennfudan"], ["--data-root", "--download", "--no-download"]),
    ],
    ids=["detfit", "train", "eval", "predict", "export", "data-pennfudan"],
)
def test_help(args, expected):
    output = invoke(*args, "--help")
    assert "Usage: detfit" in output
    for word in expected:
        assert word in output, word


def test_models_lists_the_registry():
    """Every registered name is a row (tests/test_models_families.py checks the columns)."""
    rows = {line.split()[0]: line for line in invoke("models").splitlines() if line.strip()}
    for name, spec in MODELS.items():
        assert spec.task in rows[name], name


def test_models_speed_shows_the_measured_table():
    """The figures come from benchmarks/model_speed.py's file, one row per measured model."""
    from detfit.models.catalog import CPU_SPEED_FILE

    measured = json.loads(CPU_SPEED_FILE.read_text())
    out = invoke("models", "--speed")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert measured["command"] in out
    assert {r["model"] for r in measured["rows"]} <= set(MODELS)
    for r in measured["rows"]:
        assert rows[r["model"]][1:4] == [
            f"{r['train_s_per_iter']:.2f}",
            f"{r['infer_s_per_image']:.2f}",
            str(r["peak_rss_mib"]),
        ]


def test_data_pennfudan(synthetic_root, monkeypatch, capsys):
    code, out, err = run_main(
        monkeypatch, capsys, "data", "pennfudan", "--data-root", synthetic_root.parent
    )
    assert code == 0 and err == ""
    assert f"Penn-Fudan at {synthetic_root}: verified" in out
    assert "images: 8" in out


def test_data_pennfudan_error_is_one_line(tmp_path):
    """The installed ``detfit`` script: exit code 2, one line on stderr, no traceback."""
    folder = tmp_path / "holiday photos"
    folder.mkdir()
    (folder / "beach.png").write_bytes(b"")
    exe = Path(sys.executable).with_name("detfit")
    env = {**os.environ, "DETFIT_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [str(exe), "data", "pennfudan", "--data-root", str(folder), "--no-download"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("detfit: error: ")
    assert str(folder) in lines[0] and "not a Penn-Fudan folder" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--recipe", "cpu", "--set", "epochs"], "--set 'epochs': expected KEY=VALUE"),
        (["train", "--recipe", "cpu", "--set", "bogus=1"], "bogus=1: unknown setting"),
        (["train", "--recipe", "gpu9000"], "recipe='gpu9000': must be one of auto, tutorial, cpu"),
        (["settings", "--recipe", "cpx"], "recipe='cpx': must be one of auto, tutorial, cpu"),
        (["train", "--model", "maskrcnn_resnet"], "`detfit models` lists them"),
        (["eval", "no/such/run.pt"], "no/such/run.pt: checkpoint not found"),
    ],
)
def test_user_errors_exit_2(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("detfit: error: ")
    assert message in err
    assert os.listdir(tmp_path) == []  # no run folder started


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``detfit train`` for one epoch of a tiny model on landscape synthetic images (all padded
    to 64 px high, so torchvision's poolers infer the same scales in training and in eval)."""
    tmp = tmp_path_factory.mktemp("cli")
    root = make_pennfudan(tmp / "data", num_images=8, size=(48, 80))
    run_dir = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        (tmp / "torch_home").mkdir()
        mp.setenv("TORCH_HOME", str(tmp / "torch_home"))
        mp.setattr(torch.hub, "_hub_dir", None, raising=False)

        def offline(*args, **kwargs):
            raise urllib.error.URLError("tests never download")

        mp.setattr(torch.hub, "load_state_dict_from_url", offline)
        settings = [
            "num_test=3",
            "warmup_iters=2",
            "model_options.min_size=64",
            "model_options.max_size=96",
            "model_options.fpn_channels=32",
            "model_options.mask_head_channels=32",
            "model_options.box_score_thresh=0.0",
            "model_options.box_detections_per_img=100",
            "loss_weights.loss_box_reg=1.5",
        ]
        output = invoke(
            *("train", "--recipe", "cpu", "--data-root", root, "--weights-backbone", "none"),
            *("--epochs", 1, "--workers", 0, "--out", run_dir, "--quiet"),
            *[arg for setting in settings for arg in ("--set", setting)],
        )
    return run_dir, output


def test_train_writes_a_run_folder(trained_run):
    run_dir, output = trained_run
    assert f"done: {run_dir}" in output
    for name in ("config.yaml", "metrics.csv", "metrics.json", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    for name in ("results.png", "pr_curve_bbox.png", "confusion_matrix.png", "val_predictions.jpg"):
        assert (run_dir / name).is_file(), name  # plots: true by default
    cfg = TrainConfig.load(run_dir / "config.yaml")
    assert (cfg.recipe, cfg.model, cfg.epochs, cfg.workers, cfg.num_test) == (
        "cpu",
        "maskrcnn_mobilenet_v2_fpn",
        1,
        0,
        3,
    )
    assert cfg.weights_backbone == "none" and cfg.warmup_iters == 2
    assert cfg.model_options["min_size"] == 64 and cfg.model_options["max_size"] == 96
    assert cfg.model_options["fpn_channels"] == 32
    assert cfg.model_options["mask_head_channels"] == 32
    # the recipe's mask loss weight stays beside the one --set adds; EMA and colour jitter are on
    assert cfg.loss_weights == {"loss_mask": 2.0, "loss_box_reg": 1.5}
    assert cfg.ema_decay == 0.99 and cfg.photometric
    history = json.loads((run_dir / "metrics.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1


def test_eval_prints_the_stats(trained_run, tmp_path):
    run_dir, _ = trained_run
    json_out = tmp_path / "stats.json"
    output = invoke("eval", run_dir / "best.pt", "--json", json_out)
    stats = json.loads(output[output.index("{\n") :])
    assert set(stats) == {"bbox", "segm"}
    assert all(list(s) == [*STAT_NAMES, "AP/person"] for s in stats.values())
    assert json.loads(json_out.read_text()) == stats
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in output  # pycocotools' summary
    # the same model on the same test split: the numbers of the training run's evaluation
    # (100 detections per image find a few objects even after one epoch, so they are not all 0)
    assert stats["bbox"]["AR100"] > 0
    row = json.loads((run_dir / "metrics.json").read_text())[0]
    for iou_type, values in stats.items():
        for name, value in values.items():  # AP/person is metrics.json's bbox_AP/person
            assert value == row[f"{iou_type}_{name}"], (iou_type, name)


def test_a_run_folder_means_best_pt(trained_run, tmp_path):
    """eval, predict and export read the same file of a run folder: best.pt."""
    from detfit.checkpoint import run_checkpoint
    from detfit.eval.saved import default_plots_dir
    from detfit.predict.backends import model_file

    run_dir, _ = trained_run
    assert run_checkpoint(run_dir) == model_file(run_dir) == run_dir / "best.pt"
    assert default_plots_dir(run_dir) == run_dir / "eval-best"
    json_out = tmp_path / "stats.json"
    invoke("eval", run_dir, "--json", json_out, "--no-plots")
    row = json.loads((run_dir / "metrics.json").read_text())[0]
    assert json.loads(json_out.read_text())["segm"]["AP"] == row["segm_AP"]


def write_image(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    pixels[5 : height - 5, width // 3 : width // 3 + 12] = (200, 180, 160)
    Image.fromarray(pixels).save(path)


def test_predict_writes_overlays_and_json(trained_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = trained_run
    sizes = {"img1": (50, 70), "img2": (60, 90)}
    for seed, (stem, (h, w)) in enumerate(sizes.items()):
        write_image(tmp_path / f"{stem}.png", h, w, seed)
    out = tmp_path / "out"
    output = invoke(
        "predict",
        run_dir / "best.pt",
        tmp_path / "img1.png",
        tmp_path / "img2.png",
        "--out",
        out,
        "--score-threshold",
        "0.0",
    )
    assert f"2 images: wrote 4 files to {out}" in output
    assert sorted(os.listdir(out)) == ["img1.json", "img1.png", "img2.json", "img2.png"]
    classes = load_checkpoint(run_dir / "best.pt")["model_info"]["classes"]
    assert classes == ["__background__", "person"]
    for stem, (h, w) in sizes.items():
        with Image.open(out / f"{stem}.png") as overlay:
            assert overlay.size == (w, h) and overlay.mode == "RGB"
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["image"] == str(tmp_path / f"{stem}.png")
        assert (record["height"], record["width"]) == (h, w)
        detections = record["detections"]
        assert 1 <= len(detections) <= 100
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        for det in detections:
            assert det["label"] == 1 and det["class"] == "person"
            x0, y0, x1, y1 = det["box_xyxy"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
            assert mask_util.decode(det["mask_rle"]).shape == (h, w)

    # a missing image: one line naming it, exit 1, and the good image is still predicted
    missing = tmp_path / "missing.png"
    other = tmp_path / "other"
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "predict",
        run_dir / "best.pt",
        tmp_path / "img1.png",
        missing,
        "--out",
        other,
        "--quiet",
    )
    assert code == 1
    assert err.splitlines()[0] == f"detfit: skipped: {missing}: not found"
    assert sorted(os.listdir(other)) == ["img1.json", "img1.png"]


def test_version_and_short_help():
    from detfit import __version__

    assert invoke("--version").strip() == f"detfit {__version__}"
    assert "Usage: detfit train" in invoke("train", "-h")
    assert "Usage: detfit data check" in invoke("data", "check", "-h")


def test_placeholders_share_one_style_and_split_one_meaning():
    """Every argument is named in capitals (``{CHECKPOINT}``), every option shows its type
    (``<path>``), and ``--split`` takes the same three names wherever it appears."""
    import typer

    from detfit.cli import app

    def commands(group, path: str):
        for name, command in getattr(group, "commands", {}).items():
            yield from commands(command, f"{path} {name}")
        if not getattr(group, "commands", None):
            yield path, group

    found = list(commands(typer.main.get_command(app), "detfit"))
    assert len(found) >= 14
    splits = []
    for path, command in found:
        for param in command.params:
            if param.param_type_name == "argument":
                assert param.metavar and param.metavar.isupper(), (path, param.name)
            elif param.metavar is not None:
                raise AssertionError(f"{path} {param.opts}: metavar {param.metavar}")
            if "--split" in getattr(param, "opts", []):
                splits.append(path)
                assert tuple(param.type_descriptor.choices) == ("train", "val", "test"), path
    assert {"detfit eval", "detfit data check", "detfit data show", "detfit data convert"} <= set(
        splits
    )


def test_help_keeps_brackets():
    """Help texts are plain: "detfit[tensorboard]" keeps its brackets."""
    assert "detfit[tensorboard]" in invoke("train", "--help").replace("\n", "")


def test_data_check_split(tmp_path, monkeypatch, capsys):
    from detfit.data.synthetic import write_all_formats

    coco = write_all_formats(tmp_path / "demo", num_images=6)["coco"]
    code, out, err = run_main(
        monkeypatch, capsys, "data", "check", f"coco:{coco}", "--split", "train"
    )
    assert code == 0, err
    assert out.count("[train]") == 1 and "[val]" not in out
    code, _, err = run_main(monkeypatch, capsys, "data", "check", f"coco:{coco}", "--split", "val")
    assert code == 2 and "no val split (it has train)" in err
