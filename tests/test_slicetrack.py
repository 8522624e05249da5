"""Sliced inference and tracking in ``detfit predict``: tiles that cover the image, detections
mapped back exactly and merged across tiles, track ids kept through a video of crossing objects,
per-object colours in the overlays, and one line (exit 2) for each bad request.

A "colour detector" stands in for a model where the test needs to know the right answer: it finds
each of a few pure colours in an image and reports its pixels' box and mask, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL, run_main
from detfit.predict.backends import Backend
from detfit.predict.overlay import MASK_ALPHA, UNTRACKED, draw_prediction, instance_colour
from detfit.predict.predictor import Prediction, Predictor
from detfit.predict.slicing import (
    Slicing,
    merge_outputs,
    sliced_output,
    tile_windows,
)

# colour -> label: two "cat" colours (two cats can cross), one "dog"
COLOURS = {(255, 0, 0): 1, (0, 0, 255): 1, (0, 255, 0): 2}
CLASSES = ["__background__", "cat", "dog"]
HINT = "give a smaller --slice or predict without it"


class ColourDetector:
    """A runner (float [3,H,W] images in, torchvision dicts out) that detects pure colours."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            self.calls.append(tuple(image.shape[-2:]))
            boxes, labels, masks = [], [], []
            for colour, label in COLOURS.items():
                target = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255
                mask = ((image - target).abs() < 0.2).all(dim=0)
                if mask.sum() < 4:
                    continue
                ys, xs = torch.nonzero(mask, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                labels.append(label)
                masks.append(mask.float())
            n = len(boxes)
            outputs.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "scores": torch.full((n,), 0.9),
                    "masks": torch.stack(masks)[:, None]
                    if n
                    else torch.zeros(0, 1, *image.shape[-2:]),
                }
            )
        return outputs


@pytest.fixture
def colour_model(monkeypatch, tmp_path) -> Path:
    """A "model file" that loads as the colour detector (for Predictor and detfit predict)."""
    detector = ColourDetector()
    info = {"name": "colour", "classes": CLASSES, "num_classes": 3}

    def load(path, device="auto", threads=None, precision=None):
        return Backend(Path(path), "checkpoint", info, runner=detector)

    monkeypatch.setattr("detfit.predict.predictor.load_backend", load)
    path = tmp_path / "colour.pt"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "height, width, size, overlap",
    [(100, 100, 50, 0.2), (1000, 700, 256, 0.0), (97, 301, 64, 0.5), (40, 500, 64, 0.9)],
)
def test_tiles_cover_the_image_exactly(height, width, size, overlap):
    windows = tile_windows(height, width, size, overlap)
    covered = np.zeros((height, width), dtype=int)
    tile = (min(size, width), min(size, height))
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == tile  # every tile the same size, edge tiles too
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel, edges included
    xs = sorted({w[0] for w in windows})
    ys = sorted({w[1] for w in windows})
    assert xs[0] == 0 and xs[-1] + tile[0] == width and ys[0] == 0 and ys[-1] + tile[1] == height
    for a, b in zip(xs, xs[1:]):  # neighbours share at least the overlap asked for
        assert a + tile[0] - b >= int(overlap * tile[0]) - 1
    assert len(windows) == len(xs) * len(ys) == len(set(windows))


def test_tiles_for_a_hand_computed_case():
    # 100 px wide, 50 px tiles, 20% overlap: a stride of 40, then the last tile flush at 50
    assert tile_windows(50, 100, 50, 0.2) == [(0, 0, 50, 50), (40, 0, 90, 50), (50, 0, 100, 50)]


def test_coordinates_map_back_exactly_for_a_hand_made_case():
    """Two windows' outputs, hand-written in window coordinates, back in image coordinates."""
    windows = [(0, 0, 40, 30), (60, 20, 100, 50)]
    mask = torch.zeros(1, 1, 30, 40)
    mask[0, 0, 5:10, 2:6] = 0.9
    outputs = [
        {
            "boxes": torch.tensor([[2.0, 5, 6, 10]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.8]),
            "masks": mask,
            "keypoints": torch.tensor([[[3.0, 7, 1]]]),
        },
        {
            "boxes": torch.tensor([[1.5, 2.25, 11, 12]]),
            "labels": torch.tensor([2]),
            "scores": torch.tensor([0.95]),
            "masks": torch.ones(1, 1, 30, 40) * 0.7,
            "keypoints": torch.tensor([[[4.0, 5, 2]]]),
        },
    ]
    merged = merge_outputs(outputs, windows, 60, 120, Slicing(32))
    assert merged["boxes"].tolist() == [[61.5, 22.25, 71, 32], [2, 5, 6, 10]]  # best first
    assert merged["labels"].tolist() == [2, 1] and merged["scores"].tolist() == pytest.approx(
        [0.95, 0.8]
    )
    assert merged["keypoints"].tolist() == [[[64, 25, 2]], [[3, 7, 1]]]
    assert merged["masks"].shape == (2, 1, 60, 120) and merged["masks"].dtype == torch.bool
    assert merged["masks"][0, 0].nonzero().min(0).values.tolist() == [20, 60]
    assert merged["masks"][0, 0].nonzero().max(0).values.tolist() == [49, 99]
    expected = torch.zeros(60, 120, dtype=torch.bool)
    expected[5:10, 2:6] = True
    assert torch.equal(merged["masks"][1, 0], expected)


@pytest.mark.parametrize("full", [False, True])
def test_a_detection_split_across_tiles_comes_back_once(full):
    """A 40 px object that three 50 px tiles each see a part of: one detection, its exact box
    and mask, whether the whole-image pass runs or not."""
    image = torch.zeros(3, 50, 100)
    image[0, 10:40, 30:70] = 1.0  # red: a cat at x 30..70, cut by the tiles at 40, 50 and 90
    detector = ColourDetector()
    out = sliced_output(detector, image, Slicing(50, 0.2, full=full))
    assert detector.calls == [(50, 50)] * 3 + [(50, 100)] * full
    assert out["boxes"].tolist() == [[30, 10, 70, 40]] and out["labels"].tolist() == [1]
    assert torch.equal(out["masks"][0, 0], image[0] > 0)


def test_neighbours_of_one_tile_are_not_merged():
    """Two cats side by side, a nested box among them, all in one tile: the model's own
    decision stands (no merging within a window), three detections come back."""
    outputs = [
        {
            "boxes": torch.tensor([[0.0, 0, 20, 20], [2, 2, 12, 12], [20, 0, 40, 20]]),
            "labels": torch.tensor([1, 1, 1]),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
        }
    ]
    merged = merge_outputs(outputs, [(0, 0, 64, 64)], 64, 64, Slicing(64))
    assert merged["boxes"].tolist() == outputs[0]["boxes"].tolist()


def test_predictor_and_predict_slice_find_small_objects(
    colour_model, tmp_path, monkeypatch, capsys
):
    image = np.zeros((300, 400, 3), np.uint8)
    image[100:104, 10:16] = (0, 255, 0)  # a 6x4 dog
    image[290:300, 390:400] = (255, 0, 0)  # a cat in the bottom right corner
    path = tmp_path / "big.png"
    Image.fromarray(image).save(path)
    predictor = Predictor(colour_model, slicing=Slicing(128, 0.25))
    p = predictor(path)
    assert p.boxes.tolist() == [[10, 100, 16, 104], [390, 290, 400, 300]]
    assert p.class_names == ["dog", "cat"] and p.masks.shape == (2, 300, 400)
    assert int(p.masks[0].sum()) == 24 and int(p.masks[1].sum()) == 100
    out = tmp_path / "out"
    code, stdout, err = run_main(
        monkeypatch, capsys, "predict", colour_model, path, "--out", out, "--slice", "128",
        "--overlap", "0.25", "--quiet",
    )  # fmt: skip
    assert code in (None, 0), err
    dets = json.loads((out / "big.json").read_text())["detections"]
    assert [d["box_xyxy"] for d in dets] == [[10, 100, 16, 104], [390, 290, 400, 300]]
    assert set(dets[0]) == {"label", "class", "category_id", "score", "box_xyxy", "mask_rle"}


def crossing_video(path: Path, frames: int = 24, height: int = 64, width: int = 128) -> None:
    """Two cats (red, blue) crossing: one left to right, one right to left, overlapping in the
    middle frames (the blue one in front); a dog standing still."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        for i in range(frames):
            pixels = np.zeros((height, width, 3), dtype=np.uint8)
            pixels[40:60, 100:116] = (0, 255, 0)
            x_red, x_blue = 4 + 4 * i, 104 - 4 * i
            pixels[10:34, x_red : x_red + 16] = (255, 0, 0)
            pixels[14:38, x_blue : x_blue + 16] = (0, 0, 255)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_track_keeps_ids_through_crossing_objects(colour_model, tmp_path, monkeypatch, capsys):
    video = tmp_path / "crossing.mp4"
    crossing_video(video)
    out = tmp_path / "out"
    code, stdout, err = run_main(
        monkeypatch, capsys, "predict", colour_model, video, "--out", out, "--track", "--quiet",
        "--batch-size", "5",
    )  # fmt: skip
    assert code in (None, 0), err
    lines = [json.loads(line) for line in (out / "crossing.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    ids: dict[str, set] = {"left": set(), "right": set(), "dog": set()}
    for frame in lines:
        for d in frame["detections"]:
            red_x0 = 4 + 4 * frame["frame"]  # where the left-to-right cat is
            near_red = abs(d["box_xyxy"][0] - red_x0) <= 2
            name = "dog" if d["class"] == "dog" else "left" if near_red else "right"
            if frame["frame"] >= 1:  # a track is confirmed on its second frame
                ids[name].add(d["track_id"])
            else:
                assert d["track_id"] is None
    assert all(len(v) == 1 and None not in v for v in ids.values()), ids
    assert len(set.union(*ids.values())) == 3  # three objects, three tracks, none switched
    assert f"{video}: tracks per class: 2 cat, 1 dog" in stdout
    with av.open(str(out / "crossing.mp4")) as container:
        frame = next(iter(container.decode(video=0))).to_ndarray(format="rgb24")
    assert frame.shape == (64, 128, 3)


def test_overlays_colour_each_object_and_its_track(tmp_path):
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    masks = torch.zeros(2, 200, 300, dtype=torch.bool)
    masks[0, 60:160, 40:140] = True
    masks[1, 80:180, 100:200] = True  # overlapping, same class
    boxes = torch.tensor([[40.0, 60, 140, 160], [100, 80, 200, 180]])
    drawn = draw_prediction(image, boxes, [1, 1], [0.9, 0.8], ["cat", "cat"], masks)
    first, second = drawn[:, 100, 60].tolist(), drawn[:, 170, 180].tolist()
    assert first == [round(MASK_ALPHA * c) for c in instance_colour(0)]
    assert second == [round(MASK_ALPHA * c) for c in instance_colour(1)] != first
    # the legend: a dark box in the top right corner, not drawn without objects
    assert drawn[:, 2, 298].tolist() == [32, 32, 32]
    empty = draw_prediction(image, boxes[:0], [], [], [], masks[:0])
    assert empty[:, 2, 298].tolist() == [0, 0, 0]
    # with track ids the colour follows the track; an untracked detection is grey
    tracked = draw_prediction(
        image, boxes, [1, 1], [0.9, 0.8], ["cat", "cat"], masks, None, [7, None]
    )
    assert tracked[:, 100, 60].tolist() == [round(MASK_ALPHA * c) for c in instance_colour(7)]
    assert tracked[:, 170, 180].tolist() == [round(MASK_ALPHA * c) for c in UNTRACKED]
    # galleries draw ground truth the same way: two overlapping cats, two colours
    from detfit.plots.gallery import draw_target

    target = {"boxes": boxes, "labels": torch.tensor([1, 1]), "masks": masks.float()}
    truth = draw_target(image, target, ["__background__", "cat"])
    assert truth[:, 100, 60].tolist() == first and truth[:, 170, 180].tolist() == second


def test_bad_slice_and_track_requests_are_one_line_each(
    colour_model, tmp_path, monkeypatch, capsys
):
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(path)
    video = tmp_path / "clip.mp4"
    crossing_video(video, frames=3)
    cases = [
        (["--slice", "100"], f"{path}: --slice 100 is larger than the image (80x60 px); {HINT}"),
        (["--slice", "48", "--overlap", "0.95"], "--overlap 0.95: must be between 0 and 0.9"),
        (["--slice", "48", "--overlap", "-0.1"], "--overlap -0.1: must be between 0 and 0.9"),
        (["--track"], f"{path}: --track follows objects through videos; this is a still image"),
        (["--slice", "48", "--tta"], "--tta and --slice cannot be combined: choose one"),
    ]
    for flags, message in cases:
        code, _, err = run_main(
            monkeypatch, capsys, "predict", colour_model, video, path, "--out", tmp_path / "o",
            "--quiet", *flags,
        )  # fmt: skip
        assert code == 2 and err == f"detfit: error: {message}\n", (flags, err)
    # a video too small for the slice is the same one line
    code, _, err = run_main(
        monkeypatch, capsys, "predict", colour_model, video, "--out", tmp_path / "v", "--quiet",
        "--slice", "200",
    )  # fmt: skip
    message = f"{video}: --slice 200 is larger than the image (128x64 px); {HINT}"
    assert code == 2 and err == f"detfit: error: {message}\n"
    # the track extra missing: one line naming it
    monkeypatch.setitem(__import__("sys").modules, "trackers", None)
    code, _, err = run_main(
        monkeypatch, capsys, "predict", colour_model, video, "--out", tmp_path / "t", "--track"
    )
    message = "--track needs the trackers package: pip install 'detfit[track]'"
    assert code == 2 and err == f"detfit: error: {message}\n"


def test_prediction_counts_per_class_from_tracks():
    from detfit.predict.tracking import VideoTracker

    tracker = VideoTracker(10, 0.5)
    for i in range(4):
        p = Prediction(  # the cat also comes out as a dog, with nearly the same box
            boxes=torch.tensor(
                [[10.0 + i, 10, 30 + i, 40], [60, 10, 80, 40], [11.0 + i, 10, 30 + i, 40]]
            ),
            labels=torch.tensor([1, 2, 2]),
            scores=torch.tensor([0.9, 0.9, 0.6]),
            class_names=["cat", "dog", "dog"] if i != 2 else ["dog", "dog", "dog"],  # hesitant
            category_ids=[1, 2, 2],
        )
        ids = tracker.update(p)
    assert ids[0] is not None and ids[1] is not None and ids[0] != ids[1]
    assert ids[2] is None  # the duplicate is not a third track
    assert tracker.counts() == {"cat": 1, "dog": 1}


def untrained_checkpoint(path: Path, coco: Path) -> Path:
    """A tiny Mask R-CNN with random weights and every candidate kept, as a checkpoint of a
    run on ``coco`` (no training: it is scored, not judged)."""
    from detfit.checkpoint import model_info
    from detfit.config import TrainConfig
    from detfit.data.loaders import build_datasets
    from detfit.models import build_model

    options = {**SMALL, "box_score_thresh": 0.0, "box_detections_per_img": 20}
    cfg = TrainConfig(
        dataset=f"coco:{coco}",
        model="maskrcnn_mobilenet_v2_fpn",
        weights=None,
        weights_backbone=None,
        model_options=options,
        batch_size=2,
        workers=0,
        threads=1,
    )
    data = build_datasets(cfg, log=lambda s: None, held_out="all")
    torch.manual_seed(0)
    model = build_model(
        cfg.model, len(data.classes), weights=None, weights_backbone=None, **options
    )
    info = model_info(cfg.model, len(data.classes), data.classes, options, model)
    info["category_ids"] = data.category_ids
    torch.save({"model": model.state_dict(), "model_info": info, "config": cfg.to_dict()}, path)
    return path


def test_eval_slice_scores_what_predict_slice_writes(tmp_path, monkeypatch, capsys):
    """``eval --slice`` and pycocotools on ``predict --slice --coco-json`` agree, on ground
    truth made from the sliced model's own top detections (so that the AP is well above 0)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from detfit.data.rle import encode_masks
    from detfit.data.synthetic import write_all_formats

    coco_file = write_all_formats(tmp_path / "data", num_images=4)["coco"]
    checkpoint = untrained_checkpoint(tmp_path / "random.pt", coco_file)
    coco = json.loads(coco_file.read_text())
    subset = {**coco, "annotations": []}
    predictor = Predictor(checkpoint, device="cpu", score_threshold=0.0, slicing=Slicing(48))
    folder = coco_file.parent / "images"
    for im in subset["images"]:
        p = predictor(folder / im["file_name"])
        for k in [k for k in range(len(p)) if p.masks[k].any()][:3]:
            x0, y0, x1, y1 = p.boxes[k].tolist()
            subset["annotations"].append(
                {
                    "id": len(subset["annotations"]) + 1,
                    "image_id": im["id"],
                    "category_id": p.category_ids[k],
                    "bbox": [x0 + 1, y0, x1 - x0 - 1, y1 - y0],
                    "segmentation": encode_masks(p.masks[k : k + 1])[0],
                    "area": float(p.masks[k].sum()),
                    "iscrowd": 0,
                }
            )
    sub = coco_file.with_name("subset.json")
    sub.write_text(json.dumps(subset))

    def eval_sliced(model_file: Path) -> tuple[dict, str]:
        """``detfit eval MODEL --slice 48`` on the subset: its JSON stats and its stderr."""
        stats = model_file.with_suffix(".stats.json")
        code, _, err = run_main(
            monkeypatch, capsys, "eval", model_file, "--data", f"coco:{sub},val={sub}", "--json",
            stats, "--no-plots", "--slice", "48",
        )  # fmt: skip
        assert code in (None, 0), err
        return json.loads(stats.read_text()), err

    expected, err = eval_sliced(checkpoint)
    assert "sliced in 48 px tiles" in err
    results = tmp_path / "results.json"
    images = [folder / im["file_name"] for im in subset["images"]]
    code, _, err = run_main(
        monkeypatch, capsys, "predict", checkpoint, *images, "--out", tmp_path / "p",
        "--score-threshold", "0", "--coco-json", results, "--image-ids", sub, "--slice", "48",
        "--quiet",
    )  # fmt: skip
    assert code in (None, 0), err
    gt = COCO(str(sub))
    # boxes in results.json, masks (without bbox) in results.segm.json
    files = {"bbox": results, "segm": results.with_name("results.segm.json")}
    for iou_type in ("bbox", "segm"):
        evaluator = COCOeval(gt, gt.loadRes(str(files[iou_type])), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert expected[iou_type]["AP"] > 0.3
        assert evaluator.stats[0] == pytest.approx(expected[iou_type]["AP"], abs=1e-6)
        assert evaluator.stats[1] == pytest.approx(expected[iou_type]["AP50"], abs=1e-6)
    # a run trained with tta: true and scored with --slice: sliced, without the run's TTA
    from detfit.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    ckpt["config"]["tta"] = True
    with_tta = tmp_path / "with_tta.pt"
    save_checkpoint(with_tta, ckpt)
    again, err = eval_sliced(with_tta)
    assert "sliced in 48 px tiles, without the run's test-time augmentation" in err
    assert again == expected


def test_scattered_small_objects_are_where_their_annotations_say(tmp_path):
    """The benchmark's data: objects inside the image, apart, painted where annotated."""
    from pycocotools.coco import COCO

    from detfit.data.synthetic import COCO_CATEGORY_IDS, write_scattered_coco

    path = write_scattered_coco(tmp_path, 2, (200, 300), 12, object_size=(16, 24), seed=3)
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 2 and 16 <= len(coco.getAnnIds()) <= 24
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(tmp_path / "images" / info["file_name"]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        painted = np.zeros(pixels.shape[:2], bool)
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert 0 <= x <= 300 - w and 0 <= y <= 200 - h and 16 <= w <= 24
            label = COCO_CATEGORY_IDS.index(ann["category_id"]) + 1
            mask = coco.annToMask(ann).astype(bool)
            assert not (painted & mask).any()  # never overlapping
            painted |= mask
            red, green = pixels[mask][:, 0], pixels[mask][:, 1]
            assert (red == 60 + 60 * label).mean() > 0.9 and (
                green == 255 - 50 * label
            ).mean() > 0.9
        assert pixels[~painted].max() < 80  # the rest is the noise background
