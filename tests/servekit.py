"""Helpers for the serve tests: one tiny model in every file kind ``detfit serve`` takes, built
once per test module (import ``served_models`` or ``tiny_models`` for the fixtures ``served``
and ``tiny``), test images, and a real ``detfit serve`` process on a free local port."""

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


def build(root: Path, exports: bool) -> dict[str, Path | list[Path]]:
    """The tiny model as a checkpoint and a run folder (best.pt), with ``exports`` also
    TorchScript and ONNX; images of four sizes, four of one size, and a larger one (closer to a
    photo) for the page and the load."""
    from detfit.export import export_model

    checkpoint = tiny_checkpoint(root / "tiny.pt", MODEL, OPTIONS)
    run = root / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "best.pt")
    models = {"checkpoint": checkpoint, "run": run}
    for fmt, name in (("onnx", "tiny.onnx"), ("torchscript", "tiny.torchscript.pt")) * exports:
        models[fmt] = export_model(checkpoint, fmt, root / name, check=False, log=lambda s: None)[0]
    return {
        **models,
        "images": write_images(root / "images"),
        "twins": write_images(root / "twins", sizes=[(80, 100)] * 4, seed=5),  # one padding
        "photo": write_images(root / "photo", sizes=[(240, 320)], seed=3)[0],
        "root": root,
    }


@pytest.fixture(scope="module", name="served")
def served_models(tmp_path_factory) -> dict[str, Path | list[Path]]:
    """Every model kind (the exports take most of a minute): for the API tests."""
    return build(tmp_path_factory.mktemp("served"), exports=True)


@pytest.fixture(scope="module", name="tiny")
def tiny_models(tmp_path_factory) -> dict[str, Path | list[Path]]:
    """The checkpoint and the images only: for the page and the process tests."""
    return build(tmp_path_factory.mktemp("tiny"), exports=False)


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
