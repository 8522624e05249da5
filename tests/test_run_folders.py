"""A run folder has one writer and one run: the lock (held by another process, released by its
death), a last.pt copied from another run, a run that died before its first checkpoint, and a
torchrun restart that must not turn a refusal into an overwrite."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_config, run_main
from detfit.checkpoint import load_checkpoint
from detfit.config import TrainConfig
from detfit.data.synthetic import make_pennfudan
from detfit.engine import Trainer
from detfit.engine.runlock import RunLock


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_pennfudan(tmp_path_factory.mktemp("data"), num_images=6, size=(48, 80))


def tiny(root: Path, out: Path, **changes) -> TrainConfig:
    settings = {**run_config(root, out).to_dict(), "epochs": 1, "num_test": 2}
    settings.update(max_iters_per_epoch=1, aspect_ratio_group_factor=-1, **changes)
    return TrainConfig.from_dict(settings)


def quiet_fit(cfg: TrainConfig, **kwargs) -> Path:
    return Trainer(cfg, progress=False, log=lambda s: None, **kwargs).fit()


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("detfit: error: ")
    return lines[0]


HOLDER = """
import sys, time
from detfit.engine.runlock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
if sys.argv[2] == "claim":
    lock.claim()
print("locked", flush=True)
time.sleep(600)
"""


def hold(folder: Path, claim: bool) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (with its record written, or not yet)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-c", HOLDER, str(folder), "claim" if claim else "no"]
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.parametrize("claim", [True, False], ids=["record written", "record not yet"])
def test_a_folder_another_process_writes_is_refused_naming_its_pid(
    root, tmp_path, monkeypatch, capsys, claim
):
    run = quiet_fit(tiny(root, tmp_path / "run"))
    holder = hold(run, claim)
    before = hashes(run)
    try:
        base = ["train", "--quiet", "--workers", "0"]
        for args in (
            [*base, "--resume", run, "--epochs", "2"],
            [*base, "--config", run / "config.yaml", "--out", run, "--overwrite"],
        ):
            code, _, err = run_main(monkeypatch, capsys, *args)
            line = one_error_line(err)
            assert code == 2 and f"{run}: process {holder.pid} is writing this run folder" in line
        assert hashes(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 released it: the run continues
    code, out, _ = run_main(monkeypatch, capsys, *base, "--resume", run, "--epochs", "2")
    assert code in (None, 0) and f"done: {run}" in out
    assert [r["epoch"] for r in load_checkpoint(run)["history"]] == [1, 2]


def test_the_lock_is_taken_and_released_by_one_trainer(root, tmp_path):
    seen = []

    class Probe(Trainer):
        def _train(self) -> None:
            with pytest.raises(Exception, match=f"process {os.getpid()} is writing"):
                RunLock(self.run_dir).acquire()
            seen.append(self.run_dir)
            super()._train()

    run = Probe(tiny(root, tmp_path / "run"), progress=False, log=lambda s: None).fit()
    assert seen == [run]
    lock = RunLock(run)
    lock.acquire()  # free again
    lock.release()


def test_resume_refuses_a_last_pt_copied_from_another_run(root, tmp_path, monkeypatch, capsys):
    mine = quiet_fit(tiny(root, tmp_path / "mine"))
    other = quiet_fit(tiny(root, tmp_path / "other", lr=0.01))
    ids = {load_checkpoint(r)["config"]["run_id"] for r in (mine, other)}
    assert len(ids) == 2 and None not in ids
    assert (
        TrainConfig.load(mine / "config.yaml").run_id == load_checkpoint(mine)["config"]["run_id"]
    )
    shutil.copy(other / "last.pt", mine / "last.pt")
    before = hashes(mine)
    code, _, err = run_main(monkeypatch, capsys, "train", "--resume", mine, "--epochs", "2")
    line = one_error_line(err)
    assert code == 2 and f"--resume {mine}: last.pt belongs to another run" in line
    assert hashes(mine) == before


def test_a_run_that_died_before_its_first_checkpoint_starts_over_on_resume(
    root, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    tiny(root, run, run_id="0123456789abcdef").save(run / "config.yaml")
    stale = run / ".last.pt.a1b2c3d4.tmp"  # the save that a kill -9 cut short
    stale.write_bytes(b"half a checkpoint")
    # the refusal of a new run in it points at --resume, and --resume works
    code, _, err = run_main(
        monkeypatch, capsys, "train", "--config", run / "config.yaml", "--out", run, "--quiet"
    )
    assert code == 2 and f"continue it with --resume {run}" in one_error_line(err)
    code, out, _ = run_main(monkeypatch, capsys, "train", "--resume", run, "--quiet")
    assert code in (None, 0), out
    assert (
        f"{run}: no checkpoint yet (the run stopped before its first one): starting it over" in out
    )
    assert not stale.exists()
    ckpt = load_checkpoint(run)
    assert [r["epoch"] for r in ckpt["history"]] == [1]
    assert ckpt["config"]["run_id"] not in (None, "0123456789abcdef")  # a new run


@pytest.mark.slow
def test_torchrun_restarts_repeat_a_refusal_and_never_overwrite(root, tmp_path):
    """attempt 0 refuses an --out folder holding a finished run; the restart torchrun makes of
    that failure refuses again (exit 2 on rank 0, one line each), and the run is untouched."""
    from test_distributed import run, torchrun, train_args

    out = tmp_path / "run"
    quiet_fit(tiny(root, out))
    before = hashes(out)
    result = run(torchrun("--standalone", "--max-restarts=1", *train_args(root, out)))
    assert result.returncode != 0
    refusals = [x for x in result.stderr.splitlines() if x.startswith("detfit: error: ")]
    assert (
        refusals
        == [
            f"detfit: error: {out}: already holds a run; continue it with --resume "
            f"{out}, or give --overwrite to start over in it"
        ]
        * 2
    ), result.stderr
    assert "has finished" not in result.stdout and "continuing" not in result.stdout
    assert hashes(out) == before


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("detfit: error: ")]


@pytest.mark.slow
def test_a_refusal_is_final_for_the_torchrun_launch(root, tmp_path):
    """Attempt 0 is refused because another process holds the (empty) --out folder; that process
    then lets go, yet the restart refuses at once with the same line instead of training: the
    refusal was recorded in torchrun's store. torchrun itself ends its failed job with exit 1."""
    from test_distributed import start, torchrun, train_args

    out = tmp_path / "held"
    out.mkdir()
    holder = RunLock(out)
    holder.acquire()
    launcher = start(torchrun("--standalone", "--max-restarts=2", *train_args(root, out)))
    try:
        first = ""
        while launcher.poll() is None and not first.startswith("detfit: error: "):
            first = launcher.stderr.readline()
        holder.release()  # the folder is free long before torchrun restarts the group
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        holder.release()
        if launcher.poll() is None:
            launcher.kill()
    line = f"detfit: error: {out}: process {os.getpid()} is writing this run folder"
    assert first.startswith(line), first + stderr
    assert error_lines(first + stderr) == [first.rstrip("\n")] * 3, stderr  # rank 0, each attempt
    assert launcher.returncode == 1, stderr
    assert "Traceback" not in first + stderr.split("ChildFailedError")[0].rsplit("Traceback", 1)[0]
    assert sorted(p.name for p in out.iterdir()) == [], "a refused restart wrote in the folder"


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_said_once(root, tmp_path):
    """A bad --set value (every rank finds it) and a missing annotation file (each rank finds it
    on its own): one line from rank 0 each, exit 2 in torchrun's report."""
    from test_distributed import run, torchrun, train_args

    args = train_args(root, tmp_path / "a", "--set", "epochs=abc")
    result = run(torchrun("--standalone", *args))
    assert error_lines(result.stderr) == ["detfit: error: epochs='abc': must be a valid integer"], (
        result.stderr
    )
    assert "exitcode  : 2" in result.stderr and result.returncode == 1
    missing = tmp_path / "nowhere.json"
    result = run(
        torchrun("--standalone", *train_args(root, tmp_path / "b", "--data", f"coco:{missing}"))
    )
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and str(missing) in lines[0], result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
