"""``detfit predict`` and ``detfit.Predictor``: every model kind (checkpoint, run folder, stripped,
ONNX, TorchScript), every input kind (files, folders, globs, videos), COCO results that score the
AP ``detfit eval`` reports, readable overlays, and one line per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import SMALL, run_main
from detfit import Predictor
from detfit.checkpoint import strip_checkpoint
from detfit.config import TrainConfig
from detfit.data.synthetic import write_all_formats
from detfit.export import export_model
from detfit.predict.overlay import PALETTE, draw_prediction, instance_colour, text_size


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A few training iterations of a tiny Mask R-CNN on the synthetic 3-class COCO set, the
    run folder, a stripped checkpoint and an ONNX export (checked on the test images)."""
    from detfit.engine import fit

    root = tmp_path_factory.mktemp("demo")
    coco = write_all_formats(root / "data", num_images=8)["coco"]
    cfg = TrainConfig(
        dataset=f"coco:{coco}",
        model="maskrcnn_mobilenet_v2_fpn",
        weights=None,
        weights_backbone=None,
        # every candidate kept (no score floor): a barely trained model then scores AP > 0
        model_options={**SMALL, "box_detections_per_img": 100, "box_score_thresh": 0.0},
        num_test=3,
        epochs=1,
        max_iters_per_epoch=8,
        batch_size=2,
        workers=0,
        out=str(root / "run"),
        threads=1,
        plots=False,
    )
    run = fit(cfg, progress=False, log=lambda _: None)
    images = sorted((Path(coco).parent / "images").glob("*.png"))
    strip_checkpoint(run, root / "small.pt")
    # export takes the stripped checkpoint (and checks parity on the demo images)
    export_model(
        root / "small.pt", "onnx", root / "model.onnx", images=images[:4], log=lambda s: None
    )
    return {"run": run, "coco": Path(coco), "images": images, "root": root}


def detections(folder: Path) -> dict[str, list[dict]]:
    return {p.stem: json.loads(p.read_text())["detections"] for p in sorted(folder.glob("*.json"))}


def test_every_model_kind_on_a_folder_and_a_glob(demo, tmp_path, monkeypatch, capsys):
    images = demo["images"]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for im in images[:2]:
        shutil.copy(im, folder / im.name)
    shutil.copy(images[2], folder / "sub" / images[2].name)
    results = {}
    for kind, model in [
        ("run", demo["run"]),
        ("stripped", demo["root"] / "small.pt"),
        ("onnx", demo["root"] / "model.onnx"),
    ]:
        out = tmp_path / kind
        code, stdout, _ = run_main(
            monkeypatch,
            capsys,
            "predict",
            model,
            folder,
            "--out",
            out,
            "--score-threshold",
            "0.0",
            "--quiet",
            "--batch-size",
            "2",
        )
        assert code in (None, 0), stdout
        assert stdout.strip() == f"3 images: wrote 6 files to {out}"
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
            images[0].stem + ".png",
            images[1].stem + ".png",
            f"sub/{images[2].stem}.png",
        ]
        results[kind] = detections(out) | detections(out / "sub")
    for kind in ("stripped", "onnx"):
        for stem, dets in results["run"].items():
            other = results[kind][stem]
            assert len(other) == len(dets), (kind, stem)
            for a, b in zip(dets, other):
                assert a["class"] == b["class"] and abs(a["score"] - b["score"]) < 1e-3
                assert np.allclose(a["box_xyxy"], b["box_xyxy"], atol=0.02)
    # a glob, with a class filter by name
    out = tmp_path / "glob"
    pattern = str(Path(images[0]).parent / "img00[0-1].png")
    code, stdout, _ = run_main(
        monkeypatch,
        capsys,
        "predict",
        demo["run"],
        pattern,
        "--out",
        out,
        "--score-threshold",
        "0",
        "--classes",
        "cat",
        "--quiet",
    )
    assert code in (None, 0) and stdout.startswith("2 images")
    kept = [d for dets in detections(out).values() for d in dets]
    assert kept and {d["class"] for d in kept} == {"cat"}
    assert {d["category_id"] for d in kept} == {7}  # the source file's id for cat


def test_coco_results_score_the_ap_of_detfit_eval(demo, tmp_path, monkeypatch, capsys):
    """Ground truth made from the model's own top detections (moved by a pixel), so that a
    barely trained model scores an AP well above 0 and the comparison means something."""
    from detfit.eval.coco import encode_masks

    coco = json.loads(demo["coco"].read_text())
    subset = {**coco, "images": coco["images"][:5], "annotations": []}
    predictor = Predictor(demo["run"], device="cpu", score_threshold=0.0)
    folder = demo["coco"].parent / "images"
    for im in subset["images"]:
        p = predictor(folder / im["file_name"])
        for k in range(min(3, len(p))):
            if not p.masks[k].any():
                continue
            x0, y0, x1, y1 = p.boxes[k].tolist()
            rle = encode_masks(p.masks[k : k + 1])[0]
            subset["annotations"].append(
                {
                    "id": len(subset["annotations"]) + 1,
                    "image_id": im["id"],
                    "category_id": p.category_ids[k],
                    "bbox": [x0 + 1, y0, x1 - x0 - 1, y1 - y0],
                    "segmentation": rle,
                    "area": float(p.masks[k].sum()),
                    "iscrowd": 0,
                }
            )
    sub = demo["coco"].with_name("subset.json")
    sub.write_text(json.dumps(subset))
    stats = tmp_path / "stats.json"
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "eval",
        demo["run"] / "best.pt",
        "--data",
        f"coco:{sub},val={sub}",
        "--json",
        stats,
    )
    assert code in (None, 0), err
    expected = json.loads(stats.read_text())
    # the stripped checkpoint evaluates to the same numbers
    code, _, _ = run_main(
        monkeypatch,
        capsys,
        "eval",
        demo["root"] / "small.pt",
        "--data",
        f"coco:{sub},val={sub}",
        "--json",
        tmp_path / "stripped.json",
    )
    assert code in (None, 0) and json.loads((tmp_path / "stripped.json").read_text()) == expected
    inputs = [demo["coco"].parent / "images" / im["file_name"] for im in subset["images"]]
    results = tmp_path / "results.json"
    code, _, _ = run_main(
        monkeypatch,
        capsys,
        "predict",
        demo["run"],
        *inputs,
        "--out",
        tmp_path / "p",
        "--score-threshold",
        "0",
        "--coco-json",
        results,
        "--image-ids",
        sub,
        "--quiet",
    )
    assert code in (None, 0)
    gt = COCO(str(sub))
    segm = results.with_name("results.segm.json")
    # one file per IoU type: mask records carry no bbox (loadRes would size them by it)
    assert all("bbox" not in d for d in json.loads(segm.read_text()))
    assert all("segmentation" not in d for d in json.loads(results.read_text()))
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for iou_type, file in (("bbox", results), ("segm", segm)):
        dt = gt.loadRes(str(file))
        assert {d["category_id"] for d in dt.dataset["annotations"]} <= {7, 3, 12}
        assert any(
            not float(d["score"]).is_integer() and len(repr(d["score"])) > 8
            for d in dt.dataset["annotations"]
        )  # scores are not rounded
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert expected[iou_type]["AP"] > 0, "the few training steps found something"
        for name, value in zip(names, evaluator.stats):  # all 12, the size ranges too
            assert value == pytest.approx(expected[iou_type][name], abs=1e-6), (iou_type, name)


def write_video(path: Path, frames: int, height: int = 64, width: int = 96) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(frames):
            pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            pixels[10:50, 5 + 4 * i : 25 + 4 * i] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_gives_an_annotated_video_and_json_lines(demo, tmp_path, monkeypatch, capsys):
    video = tmp_path / "clip.mp4"
    write_video(video, frames=7)
    out = tmp_path / "out"
    code, stdout, _ = run_main(
        monkeypatch,
        capsys,
        "predict",
        demo["root"] / "model.onnx",
        video,
        demo["images"][0],
        "--out",
        out,
        "--score-threshold",
        "0",
        "--quiet",
        "--batch-size",
        "3",
    )
    assert code in (None, 0) and stdout.startswith("1 images, 7 video frames")
    lines = (out / "clip.jsonl").read_text().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == list(range(7))
    assert all("detections" in json.loads(line) for line in lines)
    with av.open(str(out / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 7 and decoded[0].shape == (64, 96, 3)


def test_bad_inputs_are_one_line_each_and_the_rest_runs(demo, tmp_path, monkeypatch, capsys):
    good = demo["images"][:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    code, stdout, err = run_main(
        monkeypatch,
        capsys,
        "predict",
        demo["run"],
        good[0],
        broken,
        empty,
        tmp_path / "missing.jpg",
        good[1],
        "--out",
        out,
        "--quiet",
    )
    assert code == 1
    assert stdout.strip() == f"2 images: wrote 4 files to {out}"
    lines = err.strip().splitlines()
    assert len(lines) == 4, err
    assert any(str(broken) in line and "cannot decode" in line for line in lines)
    assert any(str(empty) in line and "no images" in line for line in lines)
    assert any("missing.jpg: not found" in line for line in lines)
    # a non-model file and a corrupt .onnx: one line, exit 2
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"\x08\x01garbage" * 10)
    for model, words in [(text, "not a model file"), (corrupt, "not a readable ONNX model")]:
        code, _, err = run_main(
            monkeypatch, capsys, "predict", model, good[0], "--out", tmp_path / "new"
        )
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_predictor_takes_paths_pil_numpy_and_tensors(demo):
    predictor = Predictor(demo["root"] / "small.pt", device="cpu", score_threshold=0.0)
    path = demo["images"][0]
    pil = Image.open(path).convert("RGB")
    array = np.array(pil)  # a writable copy, as torch.from_numpy wants
    results = [
        predictor(path),
        predictor(pil),
        predictor(array),
        predictor(torch.from_numpy(array).permute(2, 0, 1)),
        predictor(torch.from_numpy(array).permute(2, 0, 1).float() / 255),
    ]
    for r in results:
        assert torch.equal(r.boxes, results[0].boxes) and r.class_names == results[0].class_names
        assert r.masks.dtype == torch.bool and r.masks.shape[1:] == (array.shape[0], array.shape[1])
    assert set(results[0].class_names) <= {"cat", "dog", "bird"}


def test_default_out_is_a_new_runs_predict_folder(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        code, stdout, _ = run_main(
            monkeypatch, capsys, "predict", demo["root"] / "small.pt", demo["images"][0], "--quiet"
        )
        assert code in (None, 0) and stdout.strip().endswith(f"runs/predict-{n}")


def test_overlays_are_readable():
    image = torch.zeros(3, 300, 400, dtype=torch.uint8)
    masks = torch.zeros(2, 300, 400, dtype=torch.bool)
    masks[0, 50:150, 50:150] = True
    masks[1, 100:250, 200:350] = True
    boxes = torch.tensor([[50.0, 50, 150, 150], [200, 100, 350, 250]])
    drawn = draw_prediction(image, boxes, [1, 2], [0.9, 0.8], ["cat", "dog"], masks)
    inside = drawn[:, 120, 100].tolist()
    assert inside != [0, 0, 0] and inside == [round(0.45 * c) for c in instance_colour(0)]
    assert drawn[:, 200, 300].tolist() == [round(0.45 * c) for c in instance_colour(1)]
    assert instance_colour(0) != instance_colour(1) and (0, 0, 0) not in PALETTE
    assert text_size(64, 64) == 11 and text_size(1080, 1920) == 34
    # the label sits on a filled background above the box, in the object's colour
    assert tuple(drawn[:, 49, 50].tolist()) == instance_colour(0)
