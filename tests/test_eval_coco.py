"""CocoEvaluator against pycocotools itself: perfect predictions, parity on imperfect ones, and the
empty cases (an image without predictions, an evaluator without any result)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detfit.eval.coco import STAT_NAMES, CocoEvaluator

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# (image_id as given in the target, (height, width), [(x0, y0, x1, y1, label, iscrowd), ...])
# Areas: 450 and 660 are "small" (< 32**2), ~2300 "medium", ~11300 "large".
IMAGES = [
    (3, (120, 160), [(4, 6, 24, 30, 1, 0), (40, 10, 90, 60, 2, 0)]),
    (
        torch.tensor([5]),
        (128, 150),
        [(5, 10, 115, 120, 1, 0), (120, 4, 146, 30, 2, 1), (125, 60, 145, 95, 1, 0)],
    ),
    # the last object's box is medium (32x33 = 1056) but its mask small (992 pixels)
    (torch.tensor([9]), (100, 100), [(10, 20, 60, 70, 2, 0), (66, 5, 98, 38, 1, 0)]),
]


def notched_rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    """A filled rectangle without its top-left corner, so box IoU and mask IoU differ."""
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[y0:y1, x0:x1] = 1
    mask[y0 : y0 + (y1 - y0) // 4, x0 : x0 + (x1 - x0) // 4] = 0
    return mask


def erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return mask.clone()
    m = mask[None, None].float()
    return (-torch.nn.functional.max_pool2d(-m, 2 * k + 1, 1, k))[0, 0].to(torch.uint8)


def make_targets() -> list[dict]:
    targets = []
    for image_id, (h, w), objs in IMAGES:
        masks = torch.stack([notched_rect(h, w, *o[:4]) for o in objs])
        targets.append(
            {
                "boxes": torch.tensor([o[:4] for o in objs], dtype=torch.float32),
                "labels": torch.tensor([o[4] for o in objs], dtype=torch.int64),
                "masks": masks,
                "area": masks.flatten(1).sum(1).to(torch.float32),
                "iscrowd": torch.tensor([o[5] for o in objs], dtype=torch.int64),
                "image_id": image_id,
            }
        )
    return targets


def int_id(image_id) -> int:
    return int(image_id.reshape(-1)[0]) if isinstance(image_id, torch.Tensor) else int(image_id)


def ground_truth_as_outputs(targets: list[dict], include_crowd: bool = True) -> list[dict]:
    outputs = []
    for t in targets:
        keep = torch.ones(len(t["labels"]), dtype=torch.bool)
        if not include_crowd:
            keep = t["iscrowd"] == 0
        outputs.append(
            {
                "boxes": t["boxes"][keep].clone(),
                "labels": t["labels"][keep].clone(),
                "scores": torch.ones(int(keep.sum())),
                "masks": t["masks"][keep][:, None].float(),
            }
        )
    return outputs


def imperfect_outputs(targets: list[dict], seed: int = 0) -> list[dict]:
    """Jittered boxes (half-pixel steps, exact in float32), eroded soft masks, false positives
    (a wrong class, a duplicate, one on empty ground, one on the crowd region), distinct scores."""
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    score_pool = (torch.randperm(60, generator=gen) + 4).tolist()  # distinct k/64 scores
    for t in targets:
        h, w = t["masks"].shape[-2:]
        dets = []  # (box, label, mask)
        for j in range(len(t["labels"])):
            if t["iscrowd"][j]:
                box = t["boxes"][j] + torch.tensor([2.0, 2.0, -2.0, -2.0])
                dets.append((box, int(t["labels"][j]), erode(t["masks"][j], 2)))
                continue
            jitter = torch.randint(-6, 7, (4,), generator=gen).float() * 0.5
            box = t["boxes"][j] + jitter
            dets.append((box, int(t["labels"][j]), erode(t["masks"][j], j % 4)))
            if j == 0:  # a wrong class on the same object, and a duplicate of the right one
                dets.append((box + 1.0, 3 - int(t["labels"][j]), erode(t["masks"][j], 1)))
                dets.append((box - 1.5, int(t["labels"][j]), erode(t["masks"][j], 3)))
        empty = torch.zeros(h, w, dtype=torch.uint8)
        empty[h - 12 : h - 2, 1:11] = 1
        dets.append((torch.tensor([1.0, h - 12.0, 11.0, h - 2.0]), 1, empty))
        masks = torch.stack([m for _, _, m in dets]).float()
        outputs.append(
            {
                "boxes": torch.stack([b for b, _, _ in dets]).to(torch.float32),
                "labels": torch.tensor([c for _, c, _ in dets], dtype=torch.int64),
                "scores": torch.tensor([score_pool.pop() / 64 for _ in dets], dtype=torch.float32),
                # soft masks: 0.9 inside, 0.2 outside -- only a 0.5 threshold gives the shape back
                "masks": (masks * 0.7 + 0.2)[:, None],
            }
        )
    return outputs


def rle(mask: torch.Tensor) -> dict:
    encoded = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def xywh(box) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def write_coco_files(tmp_path: Path, targets: list[dict], outputs: list[dict]):
    """Ground truth and results as the COCO JSON files pycocotools reads, written independently
    of detfit's converters."""
    images, anns = [], []
    for t in targets:
        image_id = int_id(t["image_id"])
        h, w = t["masks"].shape[-2:]
        images.append({"id": image_id, "height": int(h), "width": int(w)})
        for j in range(len(t["labels"])):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(t["labels"][j]),
                    "bbox": xywh(t["boxes"][j]),
                    "area": float(t["area"][j]),
                    "iscrowd": int(t["iscrowd"][j]),
                    "segmentation": rle(t["masks"][j]),
                }
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "1"}, {"id": 2, "name": "2"}],
    }
    results = {"bbox": [], "segm": []}
    for t, o in zip(targets, outputs, strict=True):
        image_id = int_id(t["image_id"])
        for j in range(len(o["scores"])):
            common = {
                "image_id": image_id,
                "category_id": int(o["labels"][j]),
                "score": float(o["scores"][j]),
            }
            results["bbox"].append({**common, "bbox": xywh(o["boxes"][j])})
            binary = (o["masks"][j, 0] > 0.5).to(torch.uint8)
            results["segm"].append({**common, "segmentation": rle(binary)})
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    res_paths = {}
    for iou_type, res in results.items():
        res_paths[iou_type] = tmp_path / f"res_{iou_type}.json"
        res_paths[iou_type].write_text(json.dumps(res))
    return gt_path, res_paths, results


def pycocotools_stats(gt_path: Path, res_path: Path | None, iou_type: str) -> np.ndarray:
    """COCOeval run directly; no results at all is an empty detection set on the same images."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        if res_path is None:
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco_gt.dataset["images"],
                "annotations": [],
                "categories": coco_gt.dataset["categories"],
            }
            coco_dt.createIndex()
        else:
            coco_dt = coco_gt.loadRes(str(res_path))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def detfit_stats(targets, outputs, iou_types=("bbox", "segm")) -> dict[str, dict[str, float]]:
    evaluator = CocoEvaluator(iou_types)
    evaluator.process(targets[:1], outputs[:1])  # gathered over several calls
    evaluator.process(targets[1:], outputs[1:])
    return evaluator.evaluate()


@pytest.mark.parametrize("include_crowd", [True, False])
def test_ground_truth_as_predictions_gives_perfect_scores(include_crowd):
    targets = make_targets()
    stats = detfit_stats(targets, ground_truth_as_outputs(targets, include_crowd))
    for iou_type in ("bbox", "segm"):
        s = stats[iou_type]
        assert list(s) == list(STAT_NAMES)
        # the fixture has small, medium and large objects: every AP is defined. (pycocotools
        # divides by tp + fp + eps, so a lone true positive scores 1 - 2e-16.)
        for name in (*AP_NAMES, "AR10", "AR100", "ARs", "ARm", "ARl"):
            assert s[name] == pytest.approx(1.0, abs=1e-12), (iou_type, name, s[name])
        # at most one detection per image and class: class 1 finds 3 of its 4 objects (image 5
        # holds two), class 2 both of its own (the crowd region is not required)
        assert s["AR1"] == pytest.approx(0.875, abs=1e-12)


def test_ground_truth_conversion():
    targets = make_targets()
    evaluator = CocoEvaluator(("bbox", "segm"), classes=["__background__", "person", "bike"])
    evaluator.process(targets, ground_truth_as_outputs(targets))
    gt = evaluator.ground_truth()
    assert [(i["id"], i["height"], i["width"]) for i in gt["images"]] == [
        (3, 120, 160),
        (5, 128, 150),
        (9, 100, 100),
    ]
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 8))
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 0, 1, 0, 0, 0]
    assert gt["annotations"][0]["bbox"] == [4.0, 6.0, 20.0, 24.0]
    assert gt["annotations"][0]["area"] == float(targets[0]["masks"][0].sum())
    decoded = mask_util.decode(gt["annotations"][2]["segmentation"])
    assert np.array_equal(decoded, targets[1]["masks"][0].numpy())
    assert gt["categories"] == [{"id": 1, "name": "person"}, {"id": 2, "name": "bike"}]
    assert len(evaluator.results["bbox"]) == len(evaluator.results["segm"]) == 7


def test_parity_with_pycocotools(tmp_path):
    targets = make_targets()
    outputs = imperfect_outputs(targets)
    gt_path, res_paths, _ = write_coco_files(tmp_path, targets, outputs)
    ours = detfit_stats(targets, outputs)
    for iou_type in ("bbox", "segm"):
        reference = pycocotools_stats(gt_path, res_paths[iou_type], iou_type)
        got = np.array([ours[iou_type][n] for n in STAT_NAMES])
        assert np.abs(got - reference).max() < 1e-9, (iou_type, got, reference)
        assert 0.0 < ours[iou_type]["AP"] < 1.0  # imperfect, and not trivially zero
    # eroded masks and jittered boxes are scored differently
    assert ours["bbox"]["AP"] != ours["segm"]["AP"]


def test_stat_names_follow_pycocotools_summary_order(tmp_path):
    targets = make_targets()
    gt_path, res_paths, _ = write_coco_files(tmp_path, targets, imperfect_outputs(targets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(res_paths["bbox"])), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_eval.summarize()
    line = re.compile(
        r"\((AP|AR)\) @\[ IoU=(\S+)\s*\| area=\s*(\w+) \| maxDets=\s*(\d+) \] = (-?[\d.]+)"
    )
    rows = [line.search(s).groups() for s in buffer.getvalue().splitlines() if s.strip()]
    assert len(rows) == 12
    names = []
    for kind, iou, area, max_dets, _ in rows:
        if kind == "AP":
            suffix = {"0.50:0.95": "", "0.50": "50", "0.75": "75"}[iou]
            area_suffix = {"all": "", "small": "s", "medium": "m", "large": "l"}[area]
            assert max_dets == "100"
            names.append("AP" + suffix + area_suffix)
        else:
            assert iou == "0.50:0.95"
            names.append("AR" + (max_dets if area == "all" else area[0]))
    assert tuple(names) == STAT_NAMES
    printed = [float(r[-1]) for r in rows]
    assert np.abs(np.array(printed) - coco_eval.stats).max() <= 0.0005 + 1e-12


def test_image_without_predictions(tmp_path):
    targets = make_targets()
    outputs = imperfect_outputs(targets)
    h, w = targets[1]["masks"].shape[-2:]
    outputs[1] = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "scores": torch.zeros((0,)),
        "masks": torch.zeros((0, 1, h, w)),
    }
    gt_path, res_paths, results = write_coco_files(tmp_path, targets, outputs)
    assert not any(r["image_id"] == 5 for r in results["bbox"])
    ours = detfit_stats(targets, outputs)
    for iou_type in ("bbox", "segm"):
        reference = pycocotools_stats(gt_path, res_paths[iou_type], iou_type)
        got = np.array([ours[iou_type][n] for n in STAT_NAMES])
        assert np.abs(got - reference).max() < 1e-9, (iou_type, got, reference)
        # the only large object was in the image without predictions
        assert ours[iou_type]["APl"] == 0.0
        assert ours[iou_type]["ARl"] == 0.0


def empty_outputs(targets):
    return [
        {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "scores": torch.zeros((0,)),
            "masks": torch.zeros((0, 1, *t["masks"].shape[-2:])),
        }
        for t in targets
    ]


@pytest.mark.parametrize("images", [slice(None), slice(2, 3)], ids=["all", "no-large-object"])
def test_evaluator_without_any_result(tmp_path, images):
    targets = make_targets()[images]
    outputs = empty_outputs(targets)
    gt_path, _, results = write_coco_files(tmp_path, targets, outputs)
    assert results == {"bbox": [], "segm": []}
    evaluator = CocoEvaluator(("bbox", "segm"))
    evaluator.process(targets, outputs)
    assert evaluator.results == {"bbox": [], "segm": []}
    ours = evaluator.evaluate()
    has_large = images == slice(None)
    for iou_type in ("bbox", "segm"):
        reference = pycocotools_stats(gt_path, None, iou_type)
        got = np.array([ours[iou_type][n] for n in STAT_NAMES])
        assert np.abs(got - reference).max() < 1e-9, (iou_type, got, reference)
        s = ours[iou_type]
        # objects exist but nothing was found: 0; an area range without objects: -1
        assert s["AP"] == s["AP50"] == s["APs"] == s["APm"] == s["AR100"] == 0.0
        assert s["APl"] == s["ARl"] == (0.0 if has_large else -1.0)
        assert evaluator.coco_eval[iou_type].stats.shape == (12,)
