"""``detfit predict`` never writes over what it was given (images, the ground truth, earlier
outputs), gives the same detections whatever ``--batch-size``, and says so when a video is
shorter than its header."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL, run_main
from detfit.checkpoint import model_info, save_checkpoint
from detfit.config import TrainConfig
from detfit.models import build_model
from detfit.predict import predict_inputs

MODEL = "maskrcnn_mobilenet_v2_fpn"
SIZES = [(60, 80), (80, 60), (60, 80), (72, 72), (60, 80), (80, 60), (50, 90)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """An untrained tiny Mask R-CNN keeping every candidate (so there is much to compare), and
    photos of several sizes."""
    root = tmp_path_factory.mktemp("predict_ws")
    options = {**SMALL, "box_score_thresh": 0.0, "box_detections_per_img": 20}
    torch.manual_seed(0)
    model = build_model(MODEL, 3, weights=None, weights_backbone=None, **options)
    info = model_info(MODEL, 3, ["__background__", "a", "b"], options, model)
    cfg = TrainConfig(model=MODEL, weights=None, weights_backbone=None, model_options=options)
    save_checkpoint(root / "model.pt", {"model": model.state_dict(), "model_info": info,
                                        "config": cfg.to_dict()})  # fmt: skip
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for n, (h, w) in enumerate(SIZES):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{n:03d}.png")
    return root


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(monkeypatch, capsys, ws, *args, named: str) -> None:
    monkeypatch.chdir(ws)
    before = hashes(ws)
    code, _, err = run_main(monkeypatch, capsys, "predict", "model.pt", *args, "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("detfit: error: ") and named in lines[0], lines[0]
    assert hashes(ws) == before


def test_out_may_not_be_or_hold_an_input(ws, monkeypatch, capsys):
    refused(monkeypatch, capsys, ws, "photos", "--out", "photos", named="is the input folder")
    refused(
        monkeypatch, capsys, ws, "photos/000.png", "--out", "photos",
        named="holds the input photos/000.png",
    )  # fmt: skip
    refused(monkeypatch, capsys, ws, "photos/*.png", "--out", ".", named="holds the input")


def test_coco_json_may_not_be_an_input(ws, monkeypatch, capsys):
    gt = ws / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "000.png"}]}))
    for target in ("gt.json", "photos/000.png"):
        refused(
            monkeypatch, capsys, ws, "photos/000.png", "--out", "p", "--coco-json", target,
            "--image-ids", "gt.json", named=f"--coco-json {target}: is one of the inputs",
        )  # fmt: skip
    gt.unlink()


def test_earlier_outputs_are_kept_unless_overwrite(ws, monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "000.png"
    mine.write_bytes(b"my own picture")
    stale = out / ".clip.mp4.partial.mp4"  # a killed video prediction's leftover
    stale.write_bytes(b"half a video")
    args = ["predict", ws / "model.pt", ws / "photos" / "000.png", "--out", out, "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out}: {mine} already exist(s) from an earlier prediction" in err
    assert "--overwrite" in err and mine.read_bytes() == b"my own picture" and stale.exists()
    code, _, _ = run_main(monkeypatch, capsys, *args, "--overwrite")
    assert code in (None, 0) and mine.read_bytes()[:4] == b"\x89PNG" and not stale.exists()


def test_detections_do_not_depend_on_the_batch_size(ws):
    """Images of 4 sizes in one folder: batch 4 puts different sizes together, which pads them
    (eager torchvision pads a batch to its largest image) unless batches hold one size."""
    results = {}
    for batch in (1, 4):
        out = ws / f"batch{batch}"
        predict_inputs(
            ws / "model.pt", [ws / "photos"], out, batch_size=batch, score_threshold=0.0,
            device="cpu", progress=False, log=lambda s: None,
        )  # fmt: skip
        results[batch] = {
            p.stem: json.loads(p.read_text())["detections"] for p in sorted(out.glob("*.json"))
        }
    assert len(results[1]) == len(SIZES)
    assert sum(len(d) for d in results[1].values()) >= 3 * len(SIZES)  # something to compare
    for name, dets in results[1].items():
        other = results[4][name]
        assert [(d["label"], d["mask_rle"]) for d in dets] == [
            (d["label"], d["mask_rle"]) for d in other
        ], name
        for a, b in zip(dets, other):
            assert a["box_xyxy"] == b["box_xyxy"] and math.isclose(
                a["score"], b["score"], rel_tol=1e-5
            ), name


def test_a_video_shorter_than_its_header_is_one_line(ws, tmp_path, monkeypatch, capsys):
    """A faststart MP4 (the index first) cut in half: its header still promises every frame."""
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(40):
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code, stdout, err = run_main(
        monkeypatch, capsys, "predict", ws / "model.pt", video, "--out", out, "--quiet"
    )
    assert code in (None, 0), err
    frames = len((out / "clip.jsonl").read_text().splitlines())
    assert 0 < frames < 40
    assert err.strip() == (
        f"detfit: warning: {video}: its header says 40 frames, only {frames} could be decoded "
        "(a file cut short?); the outputs hold those"
    )


IMAGE_IDS = {
    "no file_name": ({"images": [{"id": 1}]}, "images[0] has no file_name"),
    "id not a number": (
        {"images": [{"id": "abc", "file_name": "000.png"}]},
        "images[0] (000.png): id 'abc' is not an integer",
    ),
    "images not a list": ({"images": 5}, "'images' must be a list"),
}


@pytest.mark.parametrize("case", list(IMAGE_IDS))
def test_bad_image_ids_files(ws, monkeypatch, capsys, case):
    data, named = IMAGE_IDS[case]
    (ws / "ids.json").write_text(json.dumps(data))
    args = ["photos/000.png", "--out", "p", "--coco-json", "r.json", "--image-ids", "ids.json"]
    refused(monkeypatch, capsys, ws, *args, named=f"ids.json: {named}")
    (ws / "ids.json").unlink()


@pytest.mark.parametrize("value", ["nan", "-5", "1.5"])
def test_score_threshold_outside_0_1(ws, monkeypatch, capsys, value):
    refused(
        monkeypatch, capsys, ws, "photos/000.png", "--out", "p", "--score-threshold", value,
        named=f"--score-threshold {float(value)}: must be between 0 and 1",
    )  # fmt: skip


def short_video(path: Path, frames: int = 4) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize(
    "failure, named",
    [
        ("full", "no space left on device writing"),
        ("read-only", "Permission denied (is"),
    ],
)
def test_a_video_output_the_disk_refuses_is_one_line(
    ws, tmp_path, monkeypatch, capsys, failure, named
):
    import errno

    from detfit.predict import video as video_module

    clip = tmp_path / "clip.mp4"
    short_video(clip)
    if failure == "full":

        def write(self, frame):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(video_module.VideoWriter, "write", write)
    else:
        real_open = av.open

        def refuse(path, mode="r", *args, **kwargs):
            if mode == "w":
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(av, "open", refuse)
    out = tmp_path / "out"
    code, _, err = run_main(
        monkeypatch, capsys, "predict", ws / "model.pt", clip, "--out", out, "--quiet"
    )
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and len(lines) == 2, err  # and the summary line
    assert lines[0].startswith("detfit: skipped: ") and named in lines[0] and "clip.mp4" in lines[0]
    assert not list(out.glob("*.mp4")) and not list(out.glob(".*partial*"))
