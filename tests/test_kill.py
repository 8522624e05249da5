"""kill -9 at random moments, some of them in the middle of a checkpoint save: every time the run
folder loads, and ``--resume`` carries the run on to its end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL
from detfit.checkpoint import load_checkpoint


def start(args: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "detfit", "train", *map(str, args), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def stamp(run: Path) -> int | None:
    """When last.pt was last replaced (None before the first save)."""
    try:
        return (run / "last.pt").stat().st_mtime_ns
    except FileNotFoundError:
        return None


def saving(run: Path) -> bool:
    """A save is under way: atomic_write's temporary file exists."""
    return any(name.endswith(".tmp") for name in os.listdir(run)) if run.is_dir() else False


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_the_run(synthetic_root, tmp_path):
    run = tmp_path / "run"
    fresh = ["--recipe", "tutorial", "--model", "maskrcnn_mobilenet_v2_fpn", "--weights", "none"]
    fresh += ["--weights-backbone", "none", "--data-root", synthetic_root, "--workers", "0"]
    fresh += ["--epochs", "40", "--out", run, "--overwrite", "--set", "num_test=2"]
    fresh += ["--set", f"model_options={json.dumps(SMALL)}", "--set", "threads=1"]
    fresh += ["--set", "checkpoint_every_iters=1", "--set", "max_iters_per_epoch=2"]
    rng = random.Random(0)
    kills, during_save = 0, 0
    while kills < 12:
        resuming = (run / "last.pt").is_file()
        before = stamp(run)
        proc = start(["--resume", run] if resuming else fresh)
        deadline = time.monotonic() + 180
        # each launch first writes one new checkpoint (so the run moves on), then dies either at
        # a random moment or the moment its next save is under way
        while time.monotonic() < deadline and proc.poll() is None and stamp(run) == before:
            time.sleep(0.02)
        if kills % 2:
            end = time.monotonic() + rng.uniform(0.0, 3.0)
            while time.monotonic() < end and proc.poll() is None:
                time.sleep(0.01)
        else:
            while time.monotonic() < deadline and proc.poll() is None and not saving(run):
                time.sleep(0.001)
        in_save = saving(run)
        proc.kill()
        proc.wait()
        assert proc.returncode == -9, proc.stderr.read().decode()
        kills += 1
        during_save += in_save
        if (run / "last.pt").is_file():
            ckpt = load_checkpoint(run)  # loads, whatever the moment of the kill
            if (run / "metrics.json").is_file():  # never ahead of the checkpoint
                listed = json.loads((run / "metrics.json").read_text())
                assert len(listed) <= len(ckpt["history"])
    assert during_save >= 4

    done = len(load_checkpoint(run)["history"])
    proc = start(["--resume", run, "--epochs", done + 1])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    history = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, done + 2))
    ckpt = load_checkpoint(run)
    assert ckpt["global_step"] == 2 * (done + 1)
    assert not saving(run)  # the stale temporary files were removed
