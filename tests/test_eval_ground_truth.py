"""The evaluation's ground truth is the user's own file: ``detfit eval`` on a COCO ``test=`` split
gives pycocotools' numbers on that file (its ``area``, ``iscrowd`` and ids) for the same
detections, and the ``test=``/``val=`` dataset options choose what is evaluated."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from conftest import SMALL
from detfit.config import TrainConfig
from detfit.data.images import load_rgb
from detfit.data.loaders import build_datasets
from detfit.data.synthetic import write_all_formats
from detfit.eval.coco import STAT_NAMES

MODEL = "maskrcnn_mobilenet_v2_fpn"
FILE_AREAS = (500.0, 3000.0, 12000.0)  # small, medium, large whatever the mask's pixel count


def image_key(image: torch.Tensor) -> bytes:
    """The same key for load_rgb's uint8 image and the evaluation loader's float one."""
    if image.is_floating_point():
        image = (image * 255).round().to(torch.uint8)
    return image.numpy().tobytes()


def oracle_detections(coco: COCO) -> dict[int, list[dict]]:
    """Per image id: detections made from the ground truth, some exact, some shifted (IoU < 0.75
    or < 0.5), one confident false positive per image: every AP is between 0 and 1."""
    out: dict[int, list[dict]] = {}
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        h, w = info["height"], info["width"]
        dets = []
        for k, ann in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))):
            if ann["iscrowd"]:
                continue
            mask = coco.annToMask(ann)
            shift = (0, 2, 5)[(ann["id"] + k) % 3]
            mask = np.roll(mask, shift, axis=1)
            if shift:
                mask[:, :shift] = 0
            x, y, bw, bh = ann["bbox"]
            box = [x + shift, y, x + bw + shift, y + bh]
            dets.append((ann["category_id"], 0.9 - 0.03 * k, box, mask))
        fp = np.zeros((h, w), np.uint8)
        fp[2:12, 3:15] = 1
        dets.append((coco.getCatIds()[0], 0.95, [3.0, 2.0, 15.0, 12.0], fp))
        out[image_id] = [{"category_id": c, "score": s, "box": b, "mask": m} for c, s, b, m in dets]
    return out


class Oracle(nn.Module):
    """Stands in for a trained model: returns ``detections`` for the image it recognises."""

    def __init__(self, by_key: dict[bytes, list[dict]], label_of: dict[int, int]) -> None:
        super().__init__()
        self.by_key, self.label_of = by_key, label_of
        self.roi_heads = nn.Module()
        self.roi_heads.mask_predictor = nn.Identity()  # a mask model: bbox and segm evaluated

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            dets = self.by_key[image_key(image.cpu())]
            h, w = image.shape[-2:]
            outputs.append(
                {
                    "boxes": torch.tensor([d["box"] for d in dets], dtype=torch.float32),
                    "labels": torch.tensor([self.label_of[d["category_id"]] for d in dets]),
                    "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                    "masks": torch.from_numpy(np.stack([d["mask"] for d in dets]))
                    .float()
                    .reshape(-1, 1, h, w),
                }
            )
        return outputs


def pycocotools_stats(gt_file: Path, detections: dict[int, list[dict]]) -> dict:
    """pycocotools alone on ``gt_file``: the reference numbers."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        stats = {}
        for iou_type in ("bbox", "segm"):
            results = []
            for image_id, dets in detections.items():
                for d in dets:
                    x1, y1, x2, y2 = d["box"]
                    geometry = (
                        {"bbox": [x1, y1, x2 - x1, y2 - y1]}
                        if iou_type == "bbox"
                        else {"segmentation": mask_util.encode(np.asfortranarray(d["mask"]))}
                    )
                    results.append(
                        {
                            "image_id": image_id,
                            "category_id": d["category_id"],
                            "score": d["score"],
                            **geometry,
                        }
                    )
            evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = dict(zip(STAT_NAMES, map(float, evaluator.stats)))
    return stats


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory) -> tuple[Path, Path]:
    """demo/coco: the training file, and test.json whose areas are not its masks' pixel counts
    (crossing 32² and 96²) and which marks one object as a crowd region."""
    root = tmp_path_factory.mktemp("gt")
    write_all_formats(root, num_images=6)
    train = root / "coco" / "annotations.json"
    data = json.loads(train.read_text())
    for k, ann in enumerate(data["annotations"]):
        ann["area"] = FILE_AREAS[k % 3]
    data["annotations"][1]["iscrowd"] = 1
    test = root / "coco" / "test.json"
    test.write_text(json.dumps(data))
    return train, test


def test_detfit_eval_equals_pycocotools_on_the_users_file(coco_split, tmp_path):
    """The evaluation ``detfit eval`` assembles (the run's test split through
    :func:`~detfit.data.loaders.build_datasets`, scored by
    :func:`~detfit.eval.assembly.evaluate_run`), with an oracle model whose detections are
    known, equals pycocotools run directly on the user's test file."""
    from detfit.data.loaders import build_loaders
    from detfit.eval.assembly import evaluate_run
    from detfit.eval.saved import stats_report

    train, test = coco_split
    gt = COCO(str(test))
    detections = oracle_detections(gt)
    by_key = {
        image_key(load_rgb(test.parent / "images" / gt.imgs[i]["file_name"])): d
        for i, d in detections.items()
    }
    label_of = {c: k + 1 for k, c in enumerate(sorted(gt.getCatIds()))}
    cfg = TrainConfig(
        model=MODEL, weights=None, weights_backbone=None, model_options=dict(SMALL),
        dataset=f"coco:{train},test={test}", workers=0,
    )  # fmt: skip
    data = build_datasets(cfg, log=lambda line: None, held_out="test")
    assert data.held_out == "test"
    result = evaluate_run(
        Oracle(by_key, label_of), build_loaders(cfg, data).test, cfg, torch.device("cpu"),
        classes=data.classes, progress=False,
    )  # fmt: skip
    ours = stats_report(result)
    reference = pycocotools_stats(test, detections)
    for iou_type in ("bbox", "segm"):
        for name in STAT_NAMES:
            assert ours[iou_type][name] == pytest.approx(reference[iou_type][name], abs=1e-12), (
                iou_type,
                name,
            )
    # the test can fail: the file's areas put objects in every range, and those ranges differ
    # from the masks' pixel counts, so evaluating with pixel counts would not match
    assert all(0 < reference[t][n] < 1 for t in ("bbox", "segm") for n in ("APs", "APm", "APl"))
    pixel_areas = json.loads(test.read_text())
    for ann in pixel_areas["annotations"]:
        ann["area"] = float(gt.annToMask(gt.anns[ann["id"]]).sum())
    other = tmp_path / "pixel_areas.json"
    other.write_text(json.dumps(pixel_areas))
    pixel_stats = pycocotools_stats(other, detections)
    assert any(
        pixel_stats[t][n] != reference[t][n] for t in ("bbox", "segm") for n in ("APs", "APm")
    )


def test_held_out_split_follows_the_dataset_options(coco_split):
    train, test = coco_split
    n_test = len(json.loads(test.read_text())["images"])

    def held_out(spec: str, purpose: str) -> tuple[str, int]:
        data = build_datasets(TrainConfig(dataset=spec, num_test=2), log=lambda s: None,
                              held_out=purpose)  # fmt: skip
        return data.held_out, len(data.test)

    assert held_out(f"coco:{train}", "val") == ("split", 2)
    assert held_out(f"coco:{train},test={test}", "val") == ("test", n_test)
    assert held_out(f"coco:{train},test={test}", "test") == ("test", n_test)
    both = f"coco:{train},val={train},test={test}"
    assert held_out(both, "val")[0] == "val"  # training evaluates val every epoch
    assert held_out(both, "test")[0] == "test"  # detfit eval: the test split


def test_evaluation_targets_carry_the_files_area_and_crowd(coco_split):
    _, test = coco_split
    data = build_datasets(TrainConfig(dataset=f"coco:{test},test={test}"), log=lambda s: None)
    file = json.loads(test.read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in file["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for i in range(len(data.test)):
        _, target = data.test[i]
        anns = by_image.get(int(target["image_id"]), [])
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["iscrowd"].tolist() == [a.get("iscrowd", 0) for a in anns]
