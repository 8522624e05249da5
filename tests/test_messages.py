"""Lines a user reads: a plain pickle given as a checkpoint is one line (no UserWarning from torch
before it), the run line names a val split "val", and counts are singular when they are one."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL, run_main
from detfit.data.synthetic import make_pennfudan, write_all_formats


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messages")
    with open(root / "plain.pt", "wb") as f:  # a plain pickle: no torch.save format at all
        pickle.dump({"model": {"w": [1.0, 2.0]}, "model_info": {"name": "x"}}, f)
    legacy = {"model": {"w": torch.zeros(2)}, "model_info": {"name": "x"}}
    torch.save(legacy, root / "legacy.pt", _use_new_zipfile_serialization=False)
    make_pennfudan(root / "pf", num_images=4)
    write_all_formats(root / "demo", num_images=6)
    return root


@pytest.mark.parametrize("name", ["plain.pt", "legacy.pt"])
@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_a_non_zip_checkpoint_is_one_line_without_warnings(files, name, command):
    """In a fresh process, where Python prints warnings to stderr (pytest would catch them)."""
    args = [sys.executable, "-m", "detfit", command, name]
    args += {"eval": ["--device", "cpu"], "export": [], "predict": ["pf", "--out", "p"]}[command]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning shown, none filtered
    result = subprocess.run(args, cwd=files, capture_output=True, text=True, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"detfit: error: {name}: "), result.stderr
    assert "Warning" not in result.stderr and "weights_only=False" not in result.stderr
    assert not (files / "p").exists()


def test_data_check_counts_one_class_in_the_singular(files, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"pennfudan:{files / 'pf'}")
    assert code in (None, 0)
    summary = [x for x in out.splitlines() if "annotations (" in x]
    assert summary and all(x.endswith(", 1 class, masks") for x in summary), out


def test_the_run_line_names_a_val_split_val(files, monkeypatch, capsys):
    coco = files / "demo" / "coco" / "annotations.json"
    args = ["train", "--quiet", "--out", files / "run", "--data", f"coco:{coco},val={coco}"]
    args += ["--model", "maskrcnn_mobilenet_v2_fpn", "--weights", "none"]
    args += ["--weights-backbone", "none", "--workers", "0", "--epochs", "1"]
    args += ["--set", f"model_options={json.dumps(SMALL)}", "--set", "max_iters_per_epoch=1"]
    args += ["--set", "plots=false"]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code in (None, 0), err
    line = next(x for x in out.splitlines() if x.startswith("run folder "))
    assert "| 6 train / 6 val images |" in line, line
    assert "classes" not in out.replace("3 classes", ""), out  # no "1 classes" anywhere
