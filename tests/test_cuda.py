"""The CUDA paths: training on a GPU with and without mixed precision, resume there, and a GPU
checkpoint used on the CPU. Skipped where no GPU is present (CI never has one); run on a GPU
machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import fit_until_second_evaluation, run_config, run_main
from detfit.checkpoint import load_checkpoint, rebuild_model
from detfit.config import TrainConfig
from detfit.engine import fit
from detfit.eval.saved import evaluate_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_config(root: Path, out: Path, **changes) -> TrainConfig:
    return run_config(root, out).replace(device="cuda", ema_decay=0.9, **changes)


@pytest.mark.parametrize("amp", [False, True])
def test_fit_on_cuda_and_use_the_checkpoint_on_the_cpu(synthetic_root, tmp_path, amp):
    logs: list[str] = []
    run = fit(
        cuda_config(synthetic_root, tmp_path / "run", amp=amp), progress=False, log=logs.append
    )
    assert any("device cuda" in line for line in logs)
    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in history)
    # the run's own evaluation on the GPU, scored again on the CPU from best.pt: the same AP
    # (float rounding differs between the devices; a checkpoint that lost the GPU's weights,
    # or an evaluation that scored something else, would not)
    scored = evaluate_checkpoint(run, device="cpu", progress=False, verbose=False, log=print)
    best = max(history, key=lambda r: r["segm_AP"])
    assert scored.stats["segm"]["AP"] == pytest.approx(best["segm_AP"], abs=0.02)
    assert scored.stats["bbox"]["AP"] == pytest.approx(best["bbox_AP"], abs=0.02)

    ckpt = load_checkpoint(run / "last.pt")  # mapped to the CPU
    assert (ckpt["scaler"] is not None) == amp
    if amp:
        assert ckpt["scaler"]["scale"] > 0
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    model = rebuild_model(ckpt["model_info"], ckpt["model"]).eval()
    image = torch.rand(3, 80, 64)
    with torch.no_grad():
        cpu_out = model([image])[0]
        gpu_out = model.cuda()([image.cuda()])[0]
    assert set(cpu_out) == {"boxes", "labels", "scores", "masks"}
    assert gpu_out["boxes"].device.type == "cuda"
    assert cpu_out["masks"].shape[1:] == (1, 80, 64)
    # the same weights give the same top detection on both devices
    if len(cpu_out["scores"]) and len(gpu_out["scores"]):
        assert float(gpu_out["scores"][0]) == pytest.approx(float(cpu_out["scores"][0]), abs=1e-3)
        assert torch.allclose(gpu_out["boxes"][0].cpu(), cpu_out["boxes"][0], atol=0.5)


def test_resume_on_cuda_restores_scaler_and_ema(synthetic_root, tmp_path):
    cfg = cuda_config(synthetic_root, tmp_path / "run", amp=True, max_iters_per_epoch=2)

    fit_until_second_evaluation(cfg)
    first = load_checkpoint(tmp_path / "run")
    assert first["epoch"] == 1 and first["callbacks"]["EMA"]["updates"] == 2
    logs: list[str] = []
    fit(resume=tmp_path / "run", progress=False, log=logs.append)
    last = load_checkpoint(tmp_path / "run")
    assert last["epoch"] == 2 and last["callbacks"]["EMA"]["updates"] == 4
    assert last["scaler"]["scale"] > 0
    assert any(line.startswith("resuming") for line in logs)


def test_cli_predict_on_cuda(synthetic_root, tmp_path, monkeypatch, capsys):
    run = fit(
        cuda_config(synthetic_root, tmp_path / "run", epochs=1, max_iters_per_epoch=2),
        progress=False,
        log=lambda s: None,
    )
    image = next((synthetic_root / "PNGImages").glob("*.png"))
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "predict",
        run / "last.pt",
        image,
        "--out",
        tmp_path / "pred",
        "--device",
        "cuda",
        "--score-threshold",
        "0",
    )
    assert code == 0, err
    assert f"wrote 2 files to {tmp_path / 'pred'}" in out
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()
    record = json.loads((tmp_path / "pred" / f"{image.stem}.json").read_text())
    with Image.open(image) as img:
        assert (record["width"], record["height"]) == img.size
    assert all(d["class"] == "person" for d in record["detections"])


def test_torchrun_with_nccl_on_one_gpu_with_amp(synthetic_root, tmp_path):
    """torchrun picks nccl for CUDA; a 1-GPU group trains with AMP and evaluates."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd += ["-m", "detfit", "train", "--recipe", "tutorial", "--model", "maskrcnn_mobilenet_v2_fpn"]
    cmd += ["--weights", "none", "--weights-backbone", "none", "--data-root", str(synthetic_root)]
    cmd += ["--workers", "0", "--quiet", "--out", str(out), "--epochs", "1", "--device", "cuda"]
    cmd += ["--set", "amp=true", "--set", "num_test=3", "--set", "model_options.min_size=64"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device cuda:0" in result.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["scaler"] is not None and ckpt["world_size"] == 1
