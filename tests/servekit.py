"""Helpers for the serve tests: one tiny model in every file kind ``detfit serve`` takes, built
once per test session (import ``served_models`` for the ``served`` fixture), test images, and a
real ``detfit serve`` process on a free local port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import REPO, SMALL
from exportkit import tiny_checkpoint, write_images

MODEL = "maskrcnn_mobilenet_v2_fpn"
# spread-out random heads, every candidate kept: each image gets detections of both classes
OPTIONS = {**SMALL, "box_score_thresh": 0.0, "box_detections_per_img": 30}


@pytest.fixture(scope="session", name="served")
def served_models(tmp_path_factory) -> dict[str, Path | list[Path]]:
    """The tiny model as a checkpoint, a run folder (best.pt), TorchScript and ONNX, and images
    of four sizes, four of one size, and a larger one (closer to a photo) for the page and load."""
    from detfit.export import export_model

    root = tmp_path_factory.mktemp("served")
    checkpoint = tiny_checkpoint(root / "tiny.pt", MODEL, OPTIONS)
    run = root / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "best.pt")
    images = write_images(root / "images")
    photo = write_images(root / "photo", sizes=[(240, 320)], seed=3)[0]
    twins = write_images(root / "twins", sizes=[(80, 100)] * 4, seed=5)  # one size, one padding
    models = {"checkpoint": checkpoint, "run": run}
    for fmt, name in (("onnx", "tiny.onnx"), ("torchscript", "tiny.torchscript.pt")):
        models[fmt] = export_model(checkpoint, fmt, root / name, check=False, log=lambda s: None)[0]
    return {**models, "images": images, "twins": twins, "photo": photo, "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(model: Path, *flags: str, log: Path):
    """``detfit serve MODEL --port P FLAGS`` in its own process; yields (process, base URL) once
    /health answers. The process is stopped (SIGTERM, then SIGKILL) when the block ends."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "detfit", "serve", str(model), "--port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to a minute on a busy machine
            if process.poll() is not None:
                raise AssertionError(f"detfit serve exited {process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"detfit serve did not answer on {url}: {log.read_text()}")
        yield process, url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
