"""torchrun for real: 2 gloo processes on the CPU. Training with DDP, distributed evaluation equal
to one process, SIGTERM and exact resume, a NaN on one rank, two nodes on 127.0.0.1, and an
elastic restart after kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pycocotools.mask as mask_util
import pytest
import torch

from conftest import FAST_EVAL, REPO, SMALL, TINY, run_config, run_main
from detfit.checkpoint import load_checkpoint, rebuild_model
from detfit.config import TrainConfig
from detfit.data.images import load_rgb
from detfit.data.rle import encode_masks
from detfit.engine import fit

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)
JOB = REPO / "tests" / "jobs" / "train_job.py"
TIMEOUT = 300  # seconds for any one launch: a hang fails the test instead of CI


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "DETFIT_DIST_TIMEOUT_MIN": "2",  # a collective left waiting is an error within minutes
    }


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *args]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, env=env(), **kwargs
    )


def start(cmd: list) -> subprocess.Popen:
    """``cmd`` launched in the background, its output captured."""
    return subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(root: Path, out: Path, *more: str) -> list[str]:
    """A tiny Faster R-CNN (THIN) on the synthetic set: 5 train / 3 test images."""
    args = [
        "-m",
        "detfit",
        "train",
        "--recipe",
        "tutorial",
        "--model",
        "fasterrcnn_mobilenet_v2_fpn",
    ]
    args += ["--weights", "none", "--weights-backbone", "none", "--data-root", str(root)]
    args += ["--workers", "0", "--quiet", "--out", str(out), "--set", "num_test=3"]
    args += ["--set", "threads=1", "--set", f"model_options={json.dumps(THIN)}"]
    args += ["--set", "plots=false"]  # the first test turns them on
    return args + list(more)


# Thin heads: checkpoints of a few MB, written in a blink (every step in some tests).
THIN = {**TINY, **FAST_EVAL, "fpn_channels": 32, "box_batch_size_per_image": 32}


def job_config(root: Path, out: Path, **changes) -> dict:
    """The SMALL Mask R-CNN of the in-process tests, 3 epochs of 2 steps per rank (landscape
    images: RoIAlign infers the same scales whatever batch comes first)."""
    cfg = run_config(root, out).to_dict()
    cfg.update(epochs=3, num_test=3, aspect_ratio_group_factor=-1)
    cfg.update(changes)
    return cfg


def weights_equal(a: dict, b: dict) -> None:
    assert list(a["model"]) == list(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.fixture(scope="module")
def landscape_root(tmp_path_factory) -> Path:
    from detfit.data.synthetic import make_pennfudan

    return make_pennfudan(tmp_path_factory.mktemp("landscape"), num_images=11, size=(48, 80))


def test_torchrun_trains_with_ddp_and_only_rank0_writes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    more = [
        "--epochs",
        "2",
        "--logger",
        "tensorboard,mlflow",
        "--set",
        f"mlflow_tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}",
        "--set",
        "val_loss=true",
        "--set",
        "plots=true",
    ]
    result = run(torchrun("--standalone", *train_args(synthetic_root, out, *more)))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("done: ") for line in lines) == 1  # rank 0 alone prints
    assert "torchrun: 2 processes x batch 2 = global batch 4; lr 0.005 (lr_scaling none)" in lines
    # 5 images over 2 ranks: 3 each (one repeated), so 2 steps of 2 per epoch on every rank
    assert any(
        "5 train / 3 test images | 2 iterations per epoch | device cpu x 2" in x for x in lines
    )
    cfg = TrainConfig.load(out / "config.yaml")
    assert (cfg.world_size, cfg.global_batch_size) == (2, 4)
    history = json.loads((out / "metrics.json").read_text())
    assert [(r["epoch"], r["world_size"], r["global_batch_size"]) for r in history] == [
        (1, 2, 4),
        (2, 2, 4),
    ]
    assert load_checkpoint(out)["global_step"] == 4
    assert sorted(p.name for p in out.iterdir()) == [
        ".detfit.lock",  # who writes the folder: rank 0 (see detfit.engine.runlock)
        "best.pt",
        "config.yaml",
        "confusion_matrix.png",
        "last.pt",
        "metrics.csv",
        "metrics.json",
        "pr_curve_bbox.png",
        "results.png",
        "tensorboard",
        "val_predictions.jpg",
    ]
    assert len(list((out / "tensorboard").iterdir())) == 1  # one events file: rank 0's
    client = pytest.importorskip("mlflow").MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (logged,) = client.search_runs([client.get_experiment_by_name("detfit").experiment_id])
    steps = [m.step for m in client.get_metric_history(logged.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # one MLflow run, each step once: rank 0's
    # the validation loss of all 3 test images, gathered from both ranks' shares
    assert all(r["val_loss"] > 0 and "val_loss_classifier" in r for r in history)


@pytest.fixture(scope="module")
def scored_checkpoint(synthetic_root, tmp_path_factory) -> tuple[Path, str]:
    """A barely trained Mask R-CNN, and a COCO file of the synthetic images whose ground truth is
    that model's own top detections, moved by a pixel or two: the 12 numbers are then far from 0
    (a tiny model scores ~0 on the real masks, and zeros would be equal trivially). The split
    holds out 5 images scored 2 at a time: an odd count, and a short last batch."""
    folder = tmp_path_factory.mktemp("scored")
    cfg = run_config(synthetic_root, folder / "run").to_dict()
    cfg.update(epochs=1, max_iters_per_epoch=3, num_test=5, eval_batch_size=2, threads=1)
    cfg["model_options"] = {**SMALL, "box_score_thresh": 0.0}
    run_dir = fit(TrainConfig.from_dict(cfg), progress=False, log=lambda s: None)
    ckpt = load_checkpoint(run_dir / "last.pt")
    model = rebuild_model(ckpt["model_info"], ckpt["model"]).eval()
    images, annotations = [], []
    generator = torch.Generator().manual_seed(0)
    for image_id, path in enumerate(sorted((synthetic_root / "PNGImages").glob("*.png")), 1):
        image = load_rgb(path)
        with torch.no_grad():
            out = model([image.float() / 255])[0]
        height, width = image.shape[-2:]
        images.append({"id": image_id, "file_name": path.name, "height": height, "width": width})
        boxes = out["boxes"][:3] + 0.5 * torch.randn(len(out["boxes"][:3]), 4, generator=generator)
        for box, rle in zip(boxes.tolist(), encode_masks(out["masks"][:3] > 0.5)):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": rle,
                    "area": float(mask_util.area(rle)),
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }
    path = folder / "pseudo.json"
    path.write_text(json.dumps(coco))
    return run_dir / "last.pt", f"coco:{path},images={synthetic_root / 'PNGImages'}"


def test_distributed_evaluation_equals_one_process(
    scored_checkpoint, tmp_path, monkeypatch, capsys
):
    checkpoint, data = scored_checkpoint
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["eval", checkpoint, "--data", data]
    code, _, _ = run_main(monkeypatch, capsys, *args, "--json", one)
    assert code in (None, 0)
    result = run(torchrun("--standalone", "-m", "detfit", *args, "--json", two))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('"bbox": {') == 1  # printed once, by rank 0
    single, double = json.loads(one.read_text()), json.loads(two.read_text())
    assert single == double  # every one of the 12 numbers per IoU type, exactly
    assert set(single) == {"bbox", "segm"} and all(len(s) == 12 + 1 for s in single.values())
    # not trivially equal: AP well above 0, and most numbers neither 0 nor -1 (absent sizes)
    assert single["bbox"]["AP"] > 0.3 and single["segm"]["AP"] > 0.3
    assert sum(v not in (0.0, -1.0) for s in single.values() for v in s.values()) >= 12


def test_sigterm_mid_epoch_and_resume_equal_the_uninterrupted_run(landscape_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    result = run(
        torchrun("--standalone", JOB, json.dumps({"config": job_config(landscape_root, a)}))
    )
    assert result.returncode == 0, result.stdout + result.stderr

    job = {"config": job_config(landscape_root, b), "signal_at": 3}
    result = run(torchrun("--standalone", JOB, json.dumps(job)))
    assert result.returncode != 0
    stopped = [line for line in result.stderr.splitlines() if line.startswith("detfit: stopped")]
    # 8 train images over 2 ranks in batches of 2: 2 steps per epoch; the signal comes after
    # step 3 (epoch 2, iteration 1) and step 4 finishes the epoch's training on every rank
    assert stopped == [
        f"detfit: stopped by SIGTERM at epoch 2/3, iteration 2/2; {b / 'last.pt'} holds it; "
        f"resume with: torchrun --nproc_per_node 2 -m detfit train --resume {b}"
    ]
    ckpt = load_checkpoint(b)
    assert (ckpt["epoch"], ckpt["iteration"], ckpt["evaluated"], len(ckpt["rng"])) == (
        2,
        2,
        False,
        2,
    )

    resume = ["-m", "detfit", "train", "--resume", str(b), "--quiet"]
    result = run(torchrun("--standalone", *resume))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming {b} at epoch 2/3, iteration 2/2 (of 3 epochs)" in result.stdout
    last_a, last_b = load_checkpoint(a), load_checkpoint(b)
    weights_equal(last_a, last_b)
    losses = lambda c: [(r["epoch"], r["train_loss"], r["segm_AP"]) for r in c["history"]]  # noqa: E731
    assert losses(last_a) == losses(last_b)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(landscape_root, tmp_path):
    out = tmp_path / "run"
    job = {"config": job_config(landscape_root, out, epochs=1), "nan_at": [1, 2]}
    result = run(torchrun("--standalone", JOB, json.dumps(job)))
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["train_skipped_steps"] == 1.0  # decided together: no rank waits for another
    assert load_checkpoint(out)["global_step"] == 2


def test_a_time_budget_stops_every_rank_together(landscape_root, tmp_path):
    """Rank 1's steps of epoch 2 take 21 (virtual) seconds: it must stop at once, so every rank
    stops there, evaluates and saves, instead of waiting for one another."""
    out = tmp_path / "run"
    config = job_config(landscape_root, out, time_budget="40s", lr_schedule="cosine")
    job = {"config": config, "slow_rank_epoch_by": [1, 1, 20.0]}
    result = run(torchrun("--standalone", JOB, json.dumps(job)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "time budget 40s: planned 3 epochs" in result.stdout
    assert (
        "stopping after epoch 2/3: the time budget (40s) leaves only the time to evaluate, "
        "at iteration 1/2" in result.stdout
    )
    stopped = load_checkpoint(out)
    assert (stopped["epoch"], stopped["iteration"], stopped["evaluated"]) == (2, 1, True)
    assert len(json.loads((out / "metrics.json").read_text())) == 2


@pytest.mark.slow
def test_two_nodes_on_localhost(synthetic_root, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    launches = []
    for node in (0, 1):
        cmd = torchrun(
            "--nnodes=2",
            f"--node_rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=two-nodes",
            *train_args(synthetic_root, out, "--epochs", "1"),
            nproc=1,
        )
        launches.append(start(cmd))
    outputs = [p.communicate(timeout=TIMEOUT) for p in launches]
    for p, (stdout, stderr) in zip(launches, outputs):
        assert p.returncode == 0, stdout + stderr
    assert sum("done: " in stdout for stdout, _ in outputs) == 1
    (row,) = json.loads((out / "metrics.json").read_text())
    assert (row["world_size"], row["global_batch_size"]) == (2, 4)
    assert load_checkpoint(out)["global_step"] == 2


def wait_for(predicate, timeout: float = TIMEOUT, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(every)


def global_step(run_dir: Path) -> int:
    try:
        return load_checkpoint(run_dir)["global_step"]
    except Exception:
        return -1


def test_elastic_restart_continues_after_a_worker_is_killed(landscape_root, tmp_path):
    out = tmp_path / "run"
    # 6 epochs of 2 steps: the kill after step 2 lands mid-run however loaded the machine is
    args = train_args(landscape_root, out, "--epochs", "6", "--set", "checkpoint_every_iters=1")
    launcher = start(torchrun("--standalone", "--max-restarts=1", *args))
    try:
        wait_for(lambda: global_step(out) >= 2 or launcher.poll() is not None)
        workers = [p for p in psutil.Process(launcher.pid).children() if "detfit" in p.cmdline()]
        assert len(workers) == 2, launcher.communicate()
        workers[1].send_signal(signal.SIGKILL)
        # torchrun notices the death, stops the survivor, restarts the group, which resumes
        stdout, stderr = launcher.communicate(timeout=2 * TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, stdout + stderr
    assert "restart 1: continuing" in stdout
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    # 8 train images, 2 ranks, batch 2: 2 steps an epoch; the restart repeated none and lost none
    assert load_checkpoint(out)["global_step"] == 12


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint(landscape_root, tmp_path):
    out = tmp_path / "run"
    args = train_args(landscape_root, out, "--epochs", "4", "--set", "checkpoint_every_iters=1")
    launcher = start(torchrun("--standalone", *args))
    try:
        wait_for(lambda: global_step(out) >= 1 or launcher.poll() is not None)
        launcher.send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    stopped = [x for x in stderr.splitlines() if x.startswith("detfit: stopped by SIGTERM")]
    assert len(stopped) == 1, stderr
    assert stopped[0].endswith(
        f"resume with: torchrun --nproc_per_node 2 -m detfit train --resume {out}"
    )
    ckpt = load_checkpoint(out)
    assert 1 <= ckpt["global_step"] < 8
    result = run(torchrun("--standalone", "-m", "detfit", "train", "--resume", out, "--quiet"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())] == [1, 2, 3, 4]
    assert load_checkpoint(out)["global_step"] == 8
