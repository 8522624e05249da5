"""Bring your own data: COCO, VOC, YOLO and mask folders read into the same targets; COCO's
details (id mapping, crowd regions, RLE, keypoints, negatives); the dataset doctor; conversion
to COCO; multi-class training end to end in every format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import detfit.predict.overlay as overlay_module
from cocokit import assert_scores_equal, reference_scores, row_scores
from conftest import SMALL, TINY, run_main
from detfit.config import TrainConfig
from detfit.data import (
    DatasetSpec,
    DetectionDataset,
    PennFudanDataset,
    check,
    train_transforms,
    write_coco,
)
from detfit.data.formats.masks import read_mask_folder
from detfit.data.synthetic import COCO_CATEGORY_IDS, SYNTHETIC_CLASSES, write_all_formats
from detfit.engine import fit
from detfit.errors import DetfitError
from detfit.eval.coco import CocoEvaluator
from detfit.predict import predict_inputs

MASK_FORMATS = {"coco", "yolo-seg", "masks"}


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, str]:
    """format -> dataset spec; the same synthetic annotations in each."""
    paths = write_all_formats(tmp_path_factory.mktemp("formats"), num_images=8)
    return {name: f"{name.removesuffix('-seg')}:{path}" for name, path in paths.items()}


def by_stem(spec: str) -> tuple[dict[str, dict], list[str]]:
    annotations = DatasetSpec.parse(spec).read()
    dataset = DetectionDataset(annotations)
    return {r.path.stem: dataset[i][1] for i, r in enumerate(annotations.images)}, dataset.classes


# ---------------------------------------------------------------- one contract for every format


def test_every_format_loads_the_same_targets(formats):
    reference, ref_classes = by_stem(formats["coco"])
    assert ref_classes == ["__background__", "dog", "cat", "bird"]  # COCO order: ids 3, 7, 12
    assert sum(len(t["labels"]) for t in reference.values()) == 9
    for name, spec in formats.items():
        targets, classes = by_stem(spec)
        assert sorted(targets) == sorted(reference), name
        for stem, target in targets.items():
            ref = reference[stem]
            names = [classes[i] for i in target["labels"]]
            assert names == [ref_classes[i] for i in ref["labels"]], (name, stem)
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert target["boxes"].shape == ref["boxes"].shape
            assert torch.allclose(target["boxes"], ref["boxes"], atol=1.0), (name, stem)
            assert ("masks" in target) == (name in MASK_FORMATS), name
            if "masks" in target and len(target["masks"]):
                inter = (target["masks"] & ref["masks"]).flatten(1).sum(1).float()
                union = (target["masks"] | ref["masks"]).flatten(1).sum(1).float()
                assert (inter / union).min().item() >= 0.98, (name, stem)
                assert target["masks"].dtype == torch.uint8


def test_short_spec_and_yaml_file_name_the_same_dataset(formats, tmp_path):
    coco_json = Path(formats["coco"].split(":", 1)[1])
    short = DatasetSpec.parse(
        f"coco:{coco_json},images={coco_json.parent / 'images'},val={coco_json}"
    )
    spec_file = tmp_path / "data.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "format": "coco",
                "path": str(coco_json.parent),
                "train": {"path": coco_json.name, "images": "images"},
                "val": coco_json.name,
            }
        )
    )
    from_yaml = DatasetSpec.parse(spec_file)
    for split in ("train", "val"):
        a, b = short.read(split), from_yaml.read(split)
        assert a.classes == b.classes
        assert [r.path for r in a.images] == [r.path for r in b.images]
        assert a.num_instances == b.num_instances == 9
    with pytest.raises(DetfitError, match="unknown format 'cocoa'"):
        DatasetSpec.parse("cocoa:x.json")
    with pytest.raises(DetfitError, match="bad option 'colour=red'"):
        DatasetSpec.parse("coco:x.json,colour=red")


# ---------------------------------------------------------------- COCO in detail


def rect_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture
def coco_detail(tmp_path) -> Path:
    """Category ids 0 and 5, image ids 0..2: a two-part polygon, an uncompressed and a
    compressed RLE object, a crowd region, a negative image, keypoints."""
    h, w = 40, 60
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / name)
    compressed = mask_util.encode(np.asfortranarray(rect_mask(h, w, 40, 5, 55, 30)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    data = {
        "images": [
            {"id": 0, "file_name": "a.png", "width": w, "height": h},
            {"id": 1, "file_name": "b.png", "width": w, "height": h},
            {"id": 2, "file_name": "c.png", "width": w, "height": h},
        ],
        "categories": [
            {"id": 5, "name": "bike", "keypoints": ["front", "back", "seat"], "skeleton": [[1, 2]]},
            {"id": 0, "name": "person"},
        ],
        "annotations": [
            {  # two parts: the union is the object
                "id": 11,
                "image_id": 0,
                "category_id": 0,
                "bbox": [2, 2, 18, 20],
                "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10], [12, 14, 20, 14, 20, 22, 12, 22]],
                "iscrowd": 0,
                "area": 128,
            },
            {
                "id": 12,
                "image_id": 0,
                "category_id": 5,
                "bbox": [22, 5, 10, 25],
                "segmentation": uncompressed_rle(rect_mask(h, w, 22, 5, 32, 30)),
                "iscrowd": 0,
                "keypoints": [23, 6, 2, 30, 28, 1, 27, 15, 2],
                "num_keypoints": 3,
            },
            {
                "id": 13,
                "image_id": 0,
                "category_id": 5,
                "bbox": [40, 5, 15, 25],
                "segmentation": compressed,
                "iscrowd": 0,
                "keypoints": [41, 6, 2, 54, 29, 2, 0, 0, 0],
                "num_keypoints": 2,
            },
            {  # a crowd region: ignored in evaluation, never a training target
                "id": 14,
                "image_id": 0,
                "category_id": 0,
                "bbox": [2, 28, 30, 10],
                "segmentation": uncompressed_rle(rect_mask(h, w, 2, 28, 32, 38)),
                "iscrowd": 1,
                "attributes": {"occluded": True},
            },
            {
                "id": 15,
                "image_id": 2,
                "category_id": 0,
                "bbox": [5, 5, 20, 20],
                "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]],
                "iscrowd": 0,
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_ids_masks_crowd_keypoints_and_negatives(coco_detail):
    annotations = DatasetSpec.parse(f"coco:{coco_detail}").read()
    assert annotations.classes == ["__background__", "person", "bike"]  # by id: 0, then 5
    assert annotations.category_ids == [0, 0, 5]
    assert [r.image_id for r in annotations.images] == [0, 1, 2]  # the negative (1) is kept
    assert annotations.keypoint_names == ["front", "back", "seat"]

    train = DetectionDataset(annotations, train=True)
    evaluation = DetectionDataset(annotations)
    image, target = train[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    assert target["labels"].tolist() == [1, 2, 2]  # the crowd region is not a target
    assert target["image_id"].tolist() == [0]
    parts = target["masks"][0]
    assert parts.sum().item() == 2 * 8 * 8  # both polygon parts (8x8 px each)
    assert parts[2:10, 2:10].all() and parts[14:22, 12:20].all() and not parts[12, 5]
    assert torch.equal(target["masks"][1], torch.from_numpy(rect_mask(40, 60, 22, 5, 32, 30)))
    assert torch.equal(target["masks"][2], torch.from_numpy(rect_mask(40, 60, 40, 5, 55, 30)))
    assert target["keypoints"].shape == (3, 3, 3)
    assert target["keypoints"][1].tolist() == [[23, 6, 2], [30, 28, 1], [27, 15, 2]]

    _, eval_target = evaluation[0]
    assert eval_target["labels"].tolist() == [1, 2, 2, 1]
    assert eval_target["iscrowd"].tolist() == [0, 0, 0, 1]
    assert eval_target["masks"][3].sum().item() == 30 * 10

    _, negative = train[1]
    assert negative["boxes"].shape == (0, 4) and negative["masks"].shape == (0, 40, 60)

    dropped = DatasetSpec.parse(f"coco:{coco_detail},drop_empty=true").read()
    assert [r.image_id for r in dropped.images] == [0, 2]


def test_keypoints_follow_a_flip(coco_detail):
    annotations = DatasetSpec.parse(f"coco:{coco_detail}").read()
    flipped = DetectionDataset(annotations, train_transforms(hflip_prob=1.0), train=True)
    _, target = flipped[0]
    kp = target["keypoints"][1]
    assert kp[:, 2].tolist() == [2, 1, 2]  # visibility kept
    assert abs(kp[0, 0].item() - (60 - 1 - 23)) <= 1 and kp[0, 1].item() == 6
    assert target["boxes"][1].tolist() == [60 - 32, 5, 60 - 22, 30]


def test_a_flip_swaps_left_and_right_keypoints(tmp_path):
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "p.png")
    data = {
        "images": [{"id": 1, "file_name": "p.png", "width": 40, "height": 20}],
        "categories": [{"id": 1, "name": "face", "keypoints": ["nose", "left_eye", "right_eye"]}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [5, 2, 20, 15],
                "keypoints": [15, 10, 2, 10, 5, 2, 20, 5, 1],
            }
        ],
    }
    (tmp_path / "k.json").write_text(json.dumps(data))
    annotations = DatasetSpec.parse(f"coco:{tmp_path / 'k.json'}").read()
    flip = train_transforms(hflip_prob=1.0, keypoint_names=annotations.keypoint_names)
    _, target = DetectionDataset(annotations, flip, train=True)[0]
    # mirrored x is W - 1 - x (v2's pixel convention); the eyes trade places, with visibility
    assert target["keypoints"][0].tolist() == [[24, 10, 2], [19, 5, 1], [29, 5, 2]]


def test_bbox_only_coco_gives_detection_targets(tmp_path):
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "x.png")
    data = {
        "images": [{"id": 3, "file_name": "x.png", "width": 30, "height": 30}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [1, 2, 10, 5]}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    annotations = DatasetSpec.parse(f"coco:{tmp_path / 'boxes.json'}").read()
    assert not annotations.has_masks
    _, target = DetectionDataset(annotations)[0]
    assert "masks" not in target
    assert target["boxes"].tolist() == [[1, 2, 11, 7]]
    assert target["area"].tolist() == [50.0]


def test_crowd_regions_are_ignored_in_evaluation_as_pycocotools_does(coco_detail, tmp_path):
    """A detection on a crowd region is neither a hit nor a false positive: our evaluator gives
    exactly pycocotools' numbers on the file itself (written by write_coco)."""
    annotations = DatasetSpec.parse(f"coco:{coco_detail}").read()
    dataset = DetectionDataset(annotations)
    outputs = []
    for i in range(len(dataset)):
        _, t = dataset[i]
        keep = t["iscrowd"] == 0
        boxes = t["boxes"][keep]
        scores = torch.linspace(0.9, 0.6, len(boxes))
        labels = t["labels"][keep]
        if i == 0:  # one extra detection right on the crowd region, high score
            boxes = torch.cat([boxes, torch.tensor([[3.0, 29, 31, 37]])])
            scores = torch.cat([scores, torch.tensor([0.95])])
            labels = torch.cat([labels, torch.tensor([1])])
        outputs.append({"boxes": boxes, "scores": scores, "labels": labels})
    evaluator = CocoEvaluator(["bbox"], classes=annotations.classes)
    evaluator.process([dataset[i][1] for i in range(len(dataset))], outputs)
    ours = evaluator.evaluate()["bbox"]
    assert ours["AP"] == pytest.approx(1.0)  # the crowd detection costs nothing

    gt_file = tmp_path / "gt.json"
    write_coco(annotations, gt_file)
    coco_gt = COCO(str(gt_file))
    results = [
        {
            "image_id": annotations.images[i].image_id,
            "category_id": annotations.category_id(int(c)),
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
            "score": float(s),
        }
        for i, o in enumerate(outputs)
        for b, s, c in zip(o["boxes"].tolist(), o["scores"], o["labels"])
    ]
    reference = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert [ours[k] for k in ours] == pytest.approx(list(reference.stats))
    per_class = evaluator.per_class["bbox"]
    assert per_class == {"person": pytest.approx(1.0), "bike": pytest.approx(1.0)}


def test_voc_difficult_objects_are_ignored(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(root / "JPEGImages" / "p1.jpg")
    (root / "Annotations" / "p1.xml").write_text(
        "<annotation><filename>p1.jpg</filename><size><width>80</width><height>50</height>"
        "</size><object><name>car</name><difficult>0</difficult><bndbox><xmin>11</xmin>"
        "<ymin>6</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object><object><name>car</name>"
        "<difficult>1</difficult><bndbox><xmin>41</xmin><ymin>11</ymin><xmax>60</xmax>"
        "<ymax>40</ymax></bndbox></object></annotation>"
    )
    annotations = DatasetSpec.parse(f"voc:{root}").read()
    _, train_target = DetectionDataset(annotations, train=True)[0]
    assert train_target["boxes"].tolist() == [[10, 5, 30, 25]]  # VOC's 1-based inclusive pixels
    _, eval_target = DetectionDataset(annotations)[0]
    assert eval_target["iscrowd"].tolist() == [0, 1]
    evaluator = CocoEvaluator(["bbox"], classes=annotations.classes)
    detections = {
        "boxes": torch.tensor([[10.0, 5, 30, 25], [40, 10, 60, 40]]),
        "scores": torch.tensor([0.5, 0.9]),  # the difficult one scores higher: still no FP
        "labels": torch.tensor([1, 1]),
    }
    evaluator.process([eval_target], [detections])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------- the doctor


@pytest.fixture
def messy(tmp_path) -> Path:
    """A COCO export with one of every problem the doctor knows."""
    img = tmp_path / "images"
    img.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img / "ok.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(img / "gray.png")
    Image.fromarray(np.zeros((40, 60, 4), np.uint8)).save(img / "rgba.png")
    Image.fromarray(np.full((40, 60), 4000, np.uint16)).save(img / "deep.png")
    rotated = Image.fromarray(np.zeros((60, 40, 3), np.uint8))  # stored 40 wide, 60 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: 60 wide, 40 high
    rotated.save(img / "rotated.jpg", exif=exif)
    (img / "broken.png").write_bytes(b"not a png")
    names = ["ok.png", "gray.png", "rgba.png", "deep.png", "rotated.jpg", "broken.png", "gone.png"]
    images = [{"id": i, "file_name": n, "width": 60, "height": 40} for i, n in enumerate(names)]
    anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 2, "image_id": 0, "category_id": 1, "bbox": [50, 30, 20, 20]},  # partly outside
        {"id": 3, "image_id": 0, "category_id": 9, "bbox": [5, 5, 10, 10]},  # unknown category
        {"id": 4, "image_id": 99, "category_id": 1, "bbox": [5, 5, 10, 10]},  # unknown image
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
    ]
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "messy.json").write_text(json.dumps(data))
    return tmp_path / "messy.json"


def test_data_check_names_every_problem_and_fails(messy, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"coco:{messy}")
    assert code == 1
    lines = out.splitlines()

    def has(fragment_file: str, message: str, kind: str) -> bool:
        return any(fragment_file in ln and f"{kind}: " in ln and message in ln for ln in lines)

    img = messy.parent / "images"
    assert has(str(messy), "refers to unknown category id 9", "error")
    assert has(str(messy), "refers to unknown image id 99", "error")
    assert has(str(img / "ok.png"), "box of size 0x10 (dropped)", "warning")
    assert has(str(img / "ok.png"), "outside the 60x40 image (clipped to the image)", "warning")
    assert has(str(img / "gray.png"), "grayscale image (mode L)", "warning")
    assert has(str(img / "rgba.png"), "RGBA image", "warning")
    assert has(str(img / "deep.png"), "16-bit image", "warning")
    assert has(str(img / "rotated.jpg"), "EXIF orientation 6", "warning")
    assert has(str(img / "broken.png"), "unreadable image", "error")
    assert has(str(img / "gone.png"), "image file not found", "error")
    assert "4 error(s) that stop training" in out
    assert "7 images, 3 annotations" in out  # the two dangling ones are not counted


def test_training_stops_on_a_fatal_problem_with_one_line(messy, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(
        monkeypatch, capsys, "train", "--data", f"coco:{messy}", "--out", tmp_path / "run",
        "--model", "fasterrcnn_mobilenet_v2_fpn", "--weights-backbone", "none", "--quiet",
    )  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"detfit: error: {messy} (annotation 3): refers to unknown category id 9")
    assert "run detfit data check" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_repairs_reach_the_model_clean(tmp_path):
    """Out-of-image boxes are clipped; degenerate ones never reach the model; modes become RGB;
    an EXIF-rotated JPEG is read as displayed."""
    Image.fromarray(np.full((40, 60), 7, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((40, 60), 4000, np.uint16)).save(tmp_path / "deep.png")
    rotated = Image.fromarray(np.zeros((60, 40, 3), np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    data = {
        "images": [
            {"id": 0, "file_name": "gray.png", "width": 60, "height": 40},
            {"id": 1, "file_name": "deep.png", "width": 60, "height": 40},
            {"id": 2, "file_name": "rotated.jpg", "width": 60, "height": 40},
        ],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [50, 30, 20, 20]},
            {"id": 2, "image_id": 0, "category_id": 1, "bbox": [5, 5, 0, 10]},
            {"id": 3, "image_id": 0, "category_id": 1, "bbox": [5, 5, 10, -3]},
            {"id": 4, "image_id": 0, "category_id": 1, "bbox": [70, 50, 5, 5]},  # all outside
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10]},
        ],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    annotations = DatasetSpec.parse(f"coco:{tmp_path / 'a.json'}").read()
    problems = check(annotations)
    assert not any(p.fatal for p in problems) and len(problems) == 7
    dataset = DetectionDataset(annotations, train_transforms(hflip_prob=0.0), train=True)
    image, target = dataset[0]
    assert target["boxes"].tolist() == [[50, 30, 60, 40]]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    assert image[:, 0, 0].tolist() == pytest.approx([7 / 255] * 3)
    deep, _ = dataset[1]
    assert deep[:, 0, 0].tolist() == pytest.approx([(4000 >> 8) / 255] * 3)
    rotated_image, _ = dataset[2]
    assert rotated_image.shape == (3, 40, 60)


def test_mask_folder_size_mismatch_is_fatal(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.ones((40, 50), np.uint8)).save(tmp_path / "masks" / "a.png")
    annotations = DatasetSpec.parse(f"masks:{tmp_path}").read()
    (problem,) = check(annotations)
    assert problem.fatal and problem.file == str(tmp_path / "masks" / "a.png")
    assert problem.message == "mask is 50x40 but its image is 60x40"


# ---------------------------------------------------------------- conversion


def test_every_format_converts_to_coco_that_pycocotools_loads(
    formats, tmp_path, monkeypatch, capsys
):
    for name, spec in formats.items():
        out = tmp_path / f"{name}.json"
        code, stdout, _ = run_main(
            monkeypatch, capsys, "data", "convert", spec, "--to", "coco", out
        )
        assert code in (0, None), stdout
        coco = COCO(str(out))
        assert len(coco.getImgIds()) == 8 and len(coco.getAnnIds()) == 9, name
        assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(
            SYNTHETIC_CLASSES
        )
        again = DatasetSpec.parse(f"coco:{out}").read()
        assert again.num_instances == 9 and again.has_masks == (name in MASK_FORMATS)
        for record in again.images:
            assert record.path.is_file()


def test_coco_round_trip_keeps_every_annotation(coco_detail, formats, tmp_path):
    for source in (coco_detail, Path(formats["coco"].split(":", 1)[1])):
        original = json.loads(source.read_text())
        written = write_coco(DatasetSpec.parse(f"coco:{source}").read(), tmp_path / "out.json")
        key = lambda a: a["id"]  # noqa: E731
        for before, after in zip(
            sorted(original["annotations"], key=key), sorted(written["annotations"], key=key)
        ):
            for field in ("id", "image_id", "category_id", "iscrowd", "segmentation"):
                assert after.get(field, 0) == before.get(field, 0), (field, before["id"])
            assert after["bbox"] == pytest.approx(before["bbox"])
            for field in ("keypoints", "attributes", "area"):
                if field in before:
                    assert after[field] == before[field]
        assert len(written["annotations"]) == len(original["annotations"])
        assert sorted(c["id"] for c in written["categories"]) == sorted(
            c["id"] for c in original["categories"]
        )
        assert [i["id"] for i in written["images"]] == [i["id"] for i in original["images"]]


# ---------------------------------------------------------------- multi-class end to end


@pytest.mark.parametrize("name", ["coco", "voc", "yolo", "yolo-seg", "masks"])
def test_multiclass_training_in_every_format(formats, name, tmp_path, monkeypatch):
    model = "maskrcnn_mobilenet_v2_fpn" if name in MASK_FORMATS else "fasterrcnn_mobilenet_v2_fpn"
    options = {k: v for k, v in SMALL.items() if model.startswith("mask") or "mask" not in k}
    cfg = TrainConfig(
        dataset=formats[name],
        model=model,
        weights=None,
        weights_backbone=None,
        model_options=options,
        num_test=3,
        epochs=1,
        max_iters_per_epoch=3,
        batch_size=2,
        workers=0,
        out=str(tmp_path / "run"),
        threads=1,
        plots=name in ("coco", "voc"),  # masks and boxes alone; drawing costs seconds
    )
    run = fit(cfg, progress=False, log=lambda _: None)
    (row,) = json.loads((run / "metrics.json").read_text())
    reference = reference_scores(run / "last.pt")  # pycocotools on the saved model's detections
    for iou_type in ("bbox", "segm") if name in MASK_FORMATS else ("bbox",):
        per_class = {k: v for k, v in row.items() if k.startswith(f"{iou_type}_AP/")}
        assert sorted(k.split("/")[1] for k in per_class) == sorted(SYNTHETIC_CLASSES)
        assert_scores_equal(row_scores(row, iou_type), reference[iou_type])
        assert (run / f"pr_curve_{iou_type}.png").is_file() == cfg.plots
    for picture in ("results.png", "confusion_matrix.png", "val_predictions.jpg"):
        assert (run / picture).is_file() == cfg.plots
    images = sorted(Path(str(formats[name]).split(":", 1)[1]).parent.rglob("img00*.png"))[:2]
    drawn: list[str] = []
    real_label = overlay_module.label_text

    def spy(name, score, track_id=None):
        drawn.append(real_label(name, score, track_id))
        return drawn[-1]

    monkeypatch.setattr(overlay_module, "label_text", spy)
    written = predict_inputs(
        run / "last.pt", images, tmp_path / "pred", score_threshold=0.0, progress=False
    ).written
    assert drawn and all(label.split()[0] in SYNTHETIC_CLASSES for label in drawn)
    assert all(p.stat().st_size > 0 for p in written if p.suffix == ".png")
    record = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert record["detections"], "an untrained model at score 0 still detects something"
    for det in record["detections"]:
        assert det["class"] in SYNTHETIC_CLASSES
        expected_id = COCO_CATEGORY_IDS[SYNTHETIC_CLASSES.index(det["class"])]
        assert det["category_id"] == (expected_id if name == "coco" else det["label"])


def test_a_box_only_dataset_refuses_a_mask_model(formats, tmp_path):
    cfg = TrainConfig(
        dataset=formats["voc"],
        model="maskrcnn_mobilenet_v2_fpn",
        weights=None,
        weights_backbone=None,
        model_options=dict(SMALL),
        num_test=3,
        epochs=1,
        workers=0,
        out=str(tmp_path / "run"),
    )
    with pytest.raises(DetfitError, match="not every object has a mask"):
        fit(cfg, progress=False, log=lambda _: None)


# ---------------------------------------------------------------- large files


def test_a_large_coco_file_opens_without_touching_images(tmp_path, monkeypatch):
    """20,000 images that do not exist on disk: reading and sizing them opens no image."""
    n = 20_000
    data = {
        "images": [
            {"id": i, "file_name": f"missing/{i}.jpg", "width": 640, "height": 480}
            for i in range(n)
        ],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": k, "image_id": k % n, "category_id": 1, "bbox": [1, 2, 30, 40]}
            for k in range(5 * n)
        ],
    }
    path = tmp_path / "big.json"
    path.write_text(json.dumps(data))

    def no_images(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", no_images)
    annotations = DatasetSpec.parse(f"coco:{path}").read()
    dataset = DetectionDataset(annotations)
    sizes = {dataset.get_height_and_width(i) for i in range(n)}
    assert sizes == {(480, 640)} and annotations.num_instances == 5 * n


def test_eval_on_another_dataset_spec(formats, tmp_path, monkeypatch, capsys):
    cfg = TrainConfig(
        dataset=formats["coco"],
        model="fasterrcnn_mobilenet_v2_fpn",
        weights=None,
        weights_backbone=None,
        model_options={k: v for k, v in SMALL.items() if "mask" not in k},
        num_test=3,
        epochs=1,
        max_iters_per_epoch=1,
        workers=0,
        out=str(tmp_path / "run"),
    )
    run = fit(cfg, progress=False, log=lambda _: None)
    coco_json = formats["coco"].split(":", 1)[1]
    code, out, _ = run_main(
        monkeypatch, capsys, "eval", run / "last.pt", "--data", f"coco:{coco_json},val={coco_json}"
    )
    assert code in (0, None)
    stats = json.loads(out[out.index("{") :])
    assert set(stats) == {"bbox"}
    # every image of the file scored (not the run's own split), as pycocotools scores them
    reference = reference_scores(run / "last.pt", data=f"coco:{coco_json},val={coco_json}")
    assert_scores_equal(stats["bbox"], reference["bbox"])
    code, _, err = run_main(monkeypatch, capsys, "eval", run / "last.pt", "--data", formats["voc"])
    assert code == 2
    assert (
        "classes ['bird', 'cat', 'dog'] differ from the checkpoint's ['dog', 'cat', 'bird']" in err
    )


def test_keypoint_rcnn_trains_on_coco_keypoints(coco_detail, tmp_path):
    cfg = TrainConfig(
        dataset=f"coco:{coco_detail},val={coco_detail}",
        model="keypointrcnn_resnet50_fpn",
        weights=None,
        weights_backbone=None,
        model_options={
            **TINY,
            "rpn_pre_nms_top_n_test": 50,
            "rpn_post_nms_top_n_test": 10,
            "box_batch_size_per_image": 16,
        },
        epochs=1,
        workers=0,
        out=str(tmp_path / "run"),
    )
    run = fit(cfg, progress=False, log=lambda _: None)
    (row,) = json.loads((run / "metrics.json").read_text())
    reference = reference_scores(run / "last.pt")  # OKS with the file's 3-point skeleton
    for iou_type in ("bbox", "keypoints"):
        assert_scores_equal(row_scores(row, iou_type), reference[iou_type])
    info = json.loads(json.dumps(torch.load(run / "last.pt", weights_only=True)["model_info"]))
    assert info["options"]["num_keypoints"] == 3  # from the dataset's category


def test_a_box_model_drops_the_recipes_mask_head_options(formats, tmp_path):
    """`detfit train --data voc:... --model fasterrcnn_...` on the CPU recipe: its mask-head
    options and mask loss weight do not apply, so they are dropped with one line each instead of
    failing; the other loss weights stay. The same options set by the user are refused."""
    from detfit.config import recipe_config

    logs: list[str] = []
    cfg = recipe_config(
        "cpu",
        dataset=formats["voc"],
        model="fasterrcnn_mobilenet_v2_fpn",
        weights_backbone=None,
        model_options=dict(TINY),
        loss_weights={"loss_mask": 2.0, "loss_classifier": 1.5},
        ema_decay=None,
        num_test=3,
        epochs=1,
        max_iters_per_epoch=1,
        workers=0,
        out=str(tmp_path / "run"),
        plots=False,
    )
    run = fit(cfg, progress=False, log=logs.append)
    assert (
        "fasterrcnn_mobilenet_v2_fpn does not use the cpu recipe's mask_head_channels, "
        "mask_head_norm: ignored" in logs
    )
    assert "fasterrcnn_mobilenet_v2_fpn computes no loss_mask: ignoring its loss weight" in logs
    info = torch.load(run / "last.pt", weights_only=True)["model_info"]
    assert not any(k.startswith("mask_") for k in info["options"])
    # loss_classifier x 1.5 still counts: the minimised loss is the sum plus half of it
    (row,) = json.loads((run / "metrics.json").read_text())
    losses = {k: v for k, v in row.items() if k.startswith("train_loss_")}
    assert "train_loss_mask" not in losses and len(losses) == 4
    expected = sum(losses.values()) + 0.5 * row["train_loss_classifier"]
    assert row["train_loss"] == pytest.approx(expected, rel=1e-5)
    mine = cfg.replace(model_options={**TINY, "mask_levels": 1}, out=str(tmp_path / "mine"))
    with pytest.raises(DetfitError, match="does not take model option.s. mask_levels"):
        fit(mine, progress=False, log=logs.append)


def test_mask_folder_boxes_are_one_pixel_wider_than_the_tutorials(synthetic_root):
    """What the README says: boxes from masks cover whole pixels (COCO's convention) while the
    tutorial's PennFudanDataset keeps masks_to_boxes, so `data check/convert pennfudan` boxes are
    exactly 1 px wider and taller than the trained ones, and nothing else differs."""
    tutorial = PennFudanDataset(synthetic_root)
    folder = read_mask_folder(synthetic_root)
    assert len(folder.images) == len(tutorial) > 0
    for index, record in enumerate(folder.images):
        _, target = tutorial[index]
        boxes = torch.tensor([inst.box for inst in record.instances])
        assert boxes.shape == target["boxes"].shape
        torch.testing.assert_close(boxes - torch.tensor([0, 0, 1, 1.0]), target["boxes"].float())
