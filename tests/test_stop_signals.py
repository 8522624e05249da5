"""A stop sent to the whole process group (a scheduler's SIGTERM, ``timeout -s INT``, Ctrl-C in a
terminal) while DataLoader workers run: the workers leave it to the main process, which finishes
its step, saves last.pt and exits with 128 + the signal's number and one line; ``--resume`` then
ends with the weights of a run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from detfit.checkpoint import load_checkpoint
from detfit.data.synthetic import make_pennfudan

THIN = {
    "min_size": 64,
    "max_size": 96,
    "fpn_channels": 32,
    "box_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 20,
    "box_detections_per_img": 5,
}
TIMEOUT = 300


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_pennfudan(tmp_path_factory.mktemp("data"), num_images=10, size=(48, 80))


def train_command(root: Path, out: Path, *more: str) -> list[str]:
    """A tiny Faster R-CNN, batch 1, one DataLoader worker, last.pt after every step."""
    args = [sys.executable, "-m", "detfit", "train", "--recipe", "tutorial"]
    args += ["--model", "fasterrcnn_mobilenet_v2_fpn", "--weights", "none"]
    args += ["--weights-backbone", "none", "--data-root", str(root.parent), "--workers", "1"]
    args += ["--quiet", "--out", str(out), "--batch-size", "1", "--epochs", "2"]
    args += ["--set", "num_test=3", "--set", "threads=1", "--set", "plots=false"]
    args += ["--set", f"model_options={json.dumps(THIN)}", "--set", "checkpoint_every_iters=1"]
    return args + list(more)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def global_step(out: Path) -> int:
    try:
        return load_checkpoint(out)["global_step"]
    except Exception:
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_sent_to_the_process_group_saves_and_resumes_exactly(root, tmp_path, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(root, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,  # its own process group, as a shell job or a scheduler's
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while global_step(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
        assert workers, "the DataLoader worker should be running mid-epoch"
        os.killpg(proc.pid, signum)  # the main process and its DataLoader worker alike
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr
    assert proc.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    lines = stderr.strip().splitlines()
    stopped_at = load_checkpoint(out)["global_step"]
    assert 2 <= stopped_at < 14  # 7 train images, batch 1: 7 steps an epoch
    # where the stop landed depends on the machine's speed; the line names that very step
    epoch, iteration = divmod(stopped_at, 7)
    where = f"at epoch {epoch + 1}/2, iteration {iteration}/7" if iteration else f"epoch {epoch}"
    assert len(lines) == 1 and lines[0].startswith(f"detfit: stopped by {name} "), stderr
    assert where in lines[0], (where, lines[0])
    assert lines[0].endswith(f"resume with: detfit train --resume {out}")
    if signum != signal.SIGTERM:
        return
    resume = [sys.executable, "-m", "detfit", "train", "--resume", str(out), "--quiet"]
    result = subprocess.run(resume, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [1, 2]
    whole = tmp_path / "whole"
    result = subprocess.run(
        train_command(root, whole), capture_output=True, text=True, env=env(), timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    a, b = load_checkpoint(out), load_checkpoint(whole)
    assert a["global_step"] == b["global_step"] == 14
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
