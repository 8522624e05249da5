"""The COCO metric backends: faster-coco-eval (the default) gives pycocotools' numbers (every
stat per IoU type, per-class AP, the precision/recall arrays) on fixtures with crowd regions,
areas on both sides of 32² and 96², images without detections, classes without ground truth and
tied scores; ``eval_backend`` and ``detfit eval --backend`` choose it and reject unknown names.

Equal within one rounding, not bit for bit: pycocotools computes precision as
``tp / (tp + fp + np.spacing(1))``, faster-coco-eval as ``tp / (tp + fp)``, so a precision entry
differs by at most ``spacing(1) / (tp + fp)`` plus the rounding of each division (both are
within 2 ulps of 1); recall (hence every AR) is ``tp / npig`` in both and equal exactly.
Measured on these fixtures: stats and per-class AP differ by at most 2.2e-16 (AR: 0).
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

import test_eval_ground_truth as gt_test
from conftest import REPO, SMALL, run_config, run_main
from detfit.checkpoint import model_info, save_checkpoint
from detfit.config import SettingsError, TrainConfig, check_setting, settings_table
from detfit.data.images import load_rgb
from detfit.data.loaders import build_datasets
from detfit.data.synthetic import write_all_formats
from detfit.engine import Trainer
from detfit.engine.run_folder import RESUMABLE
from detfit.eval import coco as coco_module
from detfit.eval.backends import backend_names, default_backend, metric_backend
from detfit.eval.coco import KEYPOINT_STAT_NAMES, STAT_NAMES, CocoEvaluator
from detfit.models import build_model
from test_eval_coco import empty_outputs, ground_truth_as_outputs, imperfect_outputs, make_targets

BACKENDS = ("pycocotools", "faster-coco-eval")
CLASSES = ["__background__", "person", "bike", "never"]  # "never" has no ground truth
PRECISION_TOL = 2 * np.spacing(1.0)  # per precision entry (see the module docstring)
STAT_TOL = 1e-15  # a mean of such entries


def evaluate_with(backend: str, targets, outputs, iou_types) -> CocoEvaluator:
    evaluator = CocoEvaluator(iou_types, CLASSES, backend)
    evaluator.process(targets, outputs)
    evaluator.evaluate()
    return evaluator


def assert_same_numbers(targets, outputs, iou_types=("bbox", "segm")) -> None:
    """Both backends on the same detections: stats, per-class AP and the arrays behind them."""
    ref, fast = (evaluate_with(b, targets, outputs, iou_types) for b in BACKENDS)
    # evaluated a second time: loadRes must not have changed the detections the first time
    stats = {b: e.evaluate() for b, e in zip(BACKENDS, (ref, fast))}
    for iou_type in iou_types:
        names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
        a, b = stats["pycocotools"][iou_type], stats["faster-coco-eval"][iou_type]
        assert list(a) == list(b) == list(names)
        diff = {n: abs(a[n] - b[n]) for n in names}
        assert max(diff.values()) <= STAT_TOL, (iou_type, diff)
        assert all(diff[n] == 0 for n in names if n.startswith("AR")), (iou_type, diff)
        assert list(ref.per_class[iou_type]) == list(fast.per_class[iou_type]) == CLASSES[1:]
        per_class = [
            abs(ref.per_class[iou_type][c] - fast.per_class[iou_type][c]) for c in CLASSES[1:]
        ]
        assert max(per_class) <= STAT_TOL, (iou_type, ref.per_class, fast.per_class)
        assert ref.per_class[iou_type]["never"] == fast.per_class[iou_type]["never"] == -1.0
        # the arrays behind the stats (what PR curves are drawn from): same shape, same -1 cells
        ea, eb = ref.coco_eval[iou_type].eval, fast.coco_eval[iou_type].eval
        pa, pb = ea["precision"], np.asarray(eb["precision"])
        areas, max_dets = (3, 1) if iou_type == "keypoints" else (4, 3)  # [T, R, K, A, M]
        assert pa.shape == pb.shape == (10, 101, len(CLASSES) - 1, areas, max_dets)
        assert np.array_equal(pa == -1, pb == -1)
        assert np.abs(pa - pb).max() <= PRECISION_TOL
        assert np.array_equal(ea["recall"], np.asarray(eb["recall"]))
        assert np.array_equal(ea["scores"], np.asarray(eb["scores"]))


@pytest.mark.parametrize("case", ["imperfect", "perfect", "image-without-detections", "none"])
def test_boxes_and_masks_match_pycocotools(case):
    """test_eval_coco's fixture: small/medium/large objects (one whose box is medium and mask
    small), a crowd region, wrong-class and duplicate detections, one on empty ground."""
    targets = make_targets()
    outputs = {
        "imperfect": imperfect_outputs,
        "perfect": ground_truth_as_outputs,
        "image-without-detections": imperfect_outputs,
        "none": empty_outputs,
    }[case](targets)
    if case == "image-without-detections":
        outputs[1] = empty_outputs(targets[1:2])[0]
    if case == "imperfect":  # a confident detection of a class no image has
        outputs[0] = {k: v.clone() for k, v in outputs[0].items()}
        outputs[0]["labels"][-1] = 3
    assert_same_numbers(targets, outputs)


def random_scene(seed: int, num_images: int = 24, size: tuple[int, int] = (128, 160)):
    """Random rectangles and ellipses of 2 classes at every scale (areas from ~20 to ~20,000
    pixels), 10% crowd, detections near them with noise, misses, false positives of every class
    (the 3rd never in the ground truth) and scores on a 0.05 grid, so many tie."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")

    def shape(x0, y0, x1, y1, ellipse: bool) -> torch.Tensor:
        if not ellipse:
            m = torch.zeros(h, w, dtype=torch.uint8)
            m[int(y0) : int(y1), int(x0) : int(x1)] = 1
            return m
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return ((((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2) <= 1).to(torch.uint8)

    def rand(*shape_, low=0.0, high=1.0):
        return torch.rand(*shape_, generator=gen) * (high - low) + low

    targets, outputs = [], []
    for i in range(num_images):
        n = int(torch.randint(0, 6, (1,), generator=gen))
        side = rand(n, 2, low=4, high=150).clamp(max=torch.tensor([w - 2.0, h - 2.0]))
        x0 = rand(n) * (w - side[:, 0])
        y0 = rand(n) * (h - side[:, 1])
        boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], 1).floor()
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 2)
        ellipse = rand(n) < 0.5
        masks = [shape(*b.tolist(), bool(e)) for b, e in zip(boxes, ellipse)]
        masks_t = torch.stack(masks) if n else torch.zeros(0, h, w, dtype=torch.uint8)
        labels = torch.randint(1, 3, (n,), generator=gen)
        targets.append(
            {
                "image_id": i + 1,
                "boxes": boxes,
                "labels": labels,
                "masks": masks_t,
                "area": masks_t.flatten(1).sum(1).float(),
                "iscrowd": (rand(n) < 0.1).long(),
            }
        )
        det_boxes, det_labels, det_masks = [], [], []
        for j in range(n):
            if rand(1) < 0.2:  # a miss
                continue
            jitter = (torch.randn(4, generator=gen) * side[j].repeat(2) * 0.08).round()
            box = boxes[j] + jitter
            box[2:] = torch.maximum(box[2:], box[:2] + 2)
            det_boxes.append(box)
            det_labels.append(
                int(labels[j]) if rand(1) < 0.9 else int(torch.randint(1, 4, (1,), generator=gen))
            )
            det_masks.append(shape(*box.clamp(min=0).tolist(), bool(ellipse[j])))
        for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):  # false positives
            x, y = float(rand(1) * (w - 20)), float(rand(1) * (h - 20))
            bw, bh = float(rand(1, low=3, high=60)), float(rand(1, low=3, high=60))
            box = torch.tensor([x, y, min(x + bw, w), min(y + bh, h)]).floor()
            box[2:] = torch.maximum(box[2:], box[:2] + 2)
            det_boxes.append(box)
            det_labels.append(int(torch.randint(1, 4, (1,), generator=gen)))
            det_masks.append(shape(*box.tolist(), False))
        k = len(det_boxes)
        outputs.append(
            {
                "boxes": torch.stack(det_boxes) if k else torch.zeros(0, 4),
                "labels": torch.tensor(det_labels, dtype=torch.int64),
                "scores": (torch.randint(1, 21, (k,), generator=gen) * 0.05).float(),
                "masks": (torch.stack(det_masks).float() if k else torch.zeros(0, h, w))[:, None],
            }
        )
    return targets, outputs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_scenes_match_pycocotools(seed):
    targets, outputs = random_scene(seed)
    areas = torch.cat([t["area"] for t in targets])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any()
    assert (areas > 96**2).any() and torch.cat([t["iscrowd"] for t in targets]).any()
    assert any(len(o["scores"]) == 0 for o in outputs)  # images without detections
    assert_same_numbers(targets, outputs)


def keypoint_scene(num_keypoints: int, seed: int = 0):
    """People with keypoints: small (only in "all"), medium and large areas, one without visible
    keypoints (ignored), one crowd region; detections with noise, a duplicate, a false positive,
    a class without ground truth, and an image without detections."""
    gen = torch.Generator().manual_seed(seed)
    # (image, x0, y0, x1, y1, label, iscrowd, visible keypoints)
    objects = [
        (0, 5, 5, 25, 35, 1, 0, num_keypoints),  # small
        (0, 30, 10, 80, 70, 1, 0, num_keypoints - 1),  # medium
        (0, 10, 40, 40, 90, 2, 0, 0),  # no visible keypoint: ignored
        (1, 0, 0, 120, 100, 1, 0, num_keypoints),  # large
        (1, 60, 20, 110, 60, 1, 1, num_keypoints),  # crowd
        (1, 5, 50, 45, 95, 2, 0, 2),  # medium
        (2, 10, 10, 60, 60, 2, 0, num_keypoints),  # its image gets no detections
    ]
    targets, outputs = [], []
    for image in range(3):
        objs = [o for o in objects if o[0] == image]
        boxes = torch.tensor([o[1:5] for o in objs], dtype=torch.float32)
        kps = torch.zeros(len(objs), num_keypoints, 3)
        for j, (_, x0, y0, x1, y1, _, _, visible) in enumerate(objs):
            kps[j, :, 0] = x0 + torch.rand(num_keypoints, generator=gen) * (x1 - x0)
            kps[j, :, 1] = y0 + torch.rand(num_keypoints, generator=gen) * (y1 - y0)
            kps[j, :visible, 2] = 2
        wh = boxes[:, 2:] - boxes[:, :2]
        targets.append(
            {
                "image_id": image + 10,
                "boxes": boxes,
                "labels": torch.tensor([o[5] for o in objs]),
                "keypoints": kps,
                "area": wh.prod(1) * 0.8,
                "iscrowd": torch.tensor([o[6] for o in objs]),
            }
        )
        if image == 2:
            outputs.append(
                {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                 "scores": torch.zeros(0), "keypoints": torch.zeros(0, num_keypoints, 3)}
            )  # fmt: skip
            continue
        noise = torch.randn(kps.shape, generator=gen) * torch.tensor([3.0, 3.0, 0.0])
        det_kps = torch.cat([kps + noise, kps[:1] + 2 * noise[:1], kps[:1].flip(1)])
        det_kps[..., 2] = 1  # torchvision marks every predicted keypoint visible
        n = len(objs)
        outputs.append(
            {
                "boxes": torch.cat([boxes, boxes[:1], boxes[:1]]),
                "labels": torch.cat([targets[-1]["labels"], torch.tensor([1, 3])]),
                "scores": torch.tensor([0.9, 0.8, 0.7][:n] + [0.8, 0.85]),
                "keypoints": det_kps,
            }
        )
    return targets, outputs


@pytest.mark.parametrize("num_keypoints", [17, 4], ids=["coco-sigmas", "custom-sigmas"])
def test_keypoints_match_pycocotools(num_keypoints):
    targets, outputs = keypoint_scene(num_keypoints)
    assert_same_numbers(targets, outputs, ("bbox", "keypoints"))
    stats = evaluate_with("faster-coco-eval", targets, outputs, ("keypoints",)).evaluate()
    assert 0 < stats["keypoints"]["AP"] < 1 and 0 < stats["keypoints"]["APm"] < 1


def test_keypoint_stats_are_named_as_pycocotools_prints_them():
    evaluator = evaluate_with("pycocotools", *keypoint_scene(4), ("keypoints",))
    coco_eval = evaluator.coco_eval["keypoints"]
    assert coco_eval.params.areaRngLbl == ["all", "medium", "large"]
    assert coco_eval.params.maxDets == [20]
    assert len(coco_eval.stats) == len(KEYPOINT_STAT_NAMES) == 10


def test_default_backend_and_names():
    assert default_backend() == "faster-coco-eval" == TrainConfig().eval_backend
    assert set(backend_names()) == set(BACKENDS)
    assert {metric_backend(name).name for name in BACKENDS} == set(BACKENDS)
    assert metric_backend().name == CocoEvaluator().backend.name == "faster-coco-eval"


def test_evaluation_prints_only_when_verbose(capsys):
    targets = make_targets()
    for backend in BACKENDS:
        evaluator = CocoEvaluator(("bbox",), backend=backend)
        evaluator.process(targets, imperfect_outputs(targets))
        evaluator.evaluate()
        assert capsys.readouterr().out == ""
        evaluator.evaluate(verbose=True)
        assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out


def test_unknown_backend_is_refused_with_a_suggestion():
    with pytest.raises(
        SettingsError, match=r"eval_backend='pycoco': must be one of .*did you mean 'pycocotools'"
    ):
        TrainConfig(eval_backend="pycoco")
    with pytest.raises(SettingsError, match="did you mean 'faster-coco-eval'"):
        metric_backend("faster_coco_eval")
    with pytest.raises(SettingsError, match="--backend='x'"):
        check_setting("eval_backend", "x", "--backend")
    with pytest.raises(SettingsError, match="eval_backend='x'"):
        CocoEvaluator(backend="x")
    cfg = TrainConfig()
    cfg.eval_backend = "pycocotools"
    assert cfg.eval_backend == "pycocotools"
    row = next(r for r in settings_table() if r[0] == "eval_backend")
    assert row[1:3] == ("faster-coco-eval | pycocotools", "faster-coco-eval")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "no/such/run.pt", "--backend", "pycoco"],
         "--backend='pycoco': must be one of faster-coco-eval, pycocotools (did you mean 'pycocotools'?)"),
        (["train", "--recipe", "cpu", "--set", "eval_backend=faster"],
         "eval_backend='faster': must be one of faster-coco-eval, pycocotools"),
    ],
)  # fmt: skip
def test_bad_backend_is_one_line_exit_2(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("detfit: error: "), err
    assert message in err


@pytest.fixture
def backends_used(monkeypatch) -> list[str]:
    """The backend of every CocoEvaluator made from now on, in order."""
    used: list[str] = []
    real = coco_module.metric_backend

    def spy(name=None):
        backend = real(name)
        used.append(backend.name)
        return backend

    monkeypatch.setattr(coco_module, "metric_backend", spy)
    return used


def test_training_evaluates_with_the_runs_backend(synthetic_root, tmp_path, backends_used):
    cfg = run_config(synthetic_root, tmp_path / "run").replace(
        epochs=1, max_iters_per_epoch=1, num_test=2, eval_backend="pycocotools"
    )
    Trainer(cfg, progress=False, log=lambda s: None).fit()
    assert backends_used == ["pycocotools"]
    assert "eval_backend" in RESUMABLE  # the metric may change when a run continues


def test_detfit_eval_backend_flag(coco_checkpoint, backends_used, monkeypatch, capsys, tmp_path):
    """``detfit eval --backend``: both backends on one checkpoint give the same JSON."""
    checkpoint, used = coco_checkpoint, backends_used
    stats = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.json"
        code, _, err = run_main(
            monkeypatch,
            capsys,
            "eval",
            checkpoint,
            "--device",
            "cpu",
            "--backend",
            backend,
            "--json",
            out,
        )
        assert code == 0, err
        assert used[-1] == backend
        stats[backend] = json.loads(out.read_text())
    a, b = stats.values()
    assert max(abs(a[t][n] - b[t][n]) for t in a for n in a[t]) <= STAT_TOL
    run_main(monkeypatch, capsys, "eval", checkpoint, "--device", "cpu")
    assert used[-1] == "pycocotools"  # no flag: the run's own eval_backend


@pytest.fixture
def coco_checkpoint(tmp_path, monkeypatch):
    """A checkpoint whose run chose pycocotools, scored by an oracle model (test_eval_ground_truth's)
    on a COCO test split."""
    write_all_formats(tmp_path / "data", num_images=4)
    train = tmp_path / "data" / "coco" / "annotations.json"
    gt = COCO(str(train))
    detections = gt_test.oracle_detections(gt)
    by_key = {
        gt_test.image_key(load_rgb(train.parent / "images" / gt.imgs[i]["file_name"])): d
        for i, d in detections.items()
    }
    label_of = {c: k + 1 for k, c in enumerate(sorted(gt.getCatIds()))}
    cfg = TrainConfig(
        model=gt_test.MODEL, weights=None, weights_backbone=None, model_options=dict(SMALL),
        dataset=f"coco:{train},test={train}", workers=0, eval_backend="pycocotools",
    )  # fmt: skip
    model = build_model(gt_test.MODEL, 4, weights=None, weights_backbone=None, **SMALL)
    classes = ["__background__", *(gt.cats[c]["name"] for c in sorted(gt.getCatIds()))]
    info = model_info(gt_test.MODEL, 4, classes, dict(SMALL), model)
    path = tmp_path / "best.pt"
    save_checkpoint(
        path, {"model": model.state_dict(), "model_info": info, "config": cfg.to_dict()}
    )
    monkeypatch.setattr(
        "detfit.checkpoint.rebuild_model", lambda *a, **k: gt_test.Oracle(by_key, label_of)
    )
    return path


@pytest.mark.slow
def test_real_pennfudan_ground_truth_matches_pycocotools(real_root):
    """The 50 real test images of the CPU recipe's split, with detections made from their masks
    (shifted by 0-6 px, so IoUs spread around the thresholds) and a false positive per image."""
    data = build_datasets(TrainConfig(data_root=str(real_root)), log=lambda s: None)
    targets, outputs = [], []
    for k in range(len(data.test)):
        _, target = data.test[k]
        shift = k % 7
        masks = torch.roll(target["masks"], shift, dims=2)
        masks[:, :, :shift] = 0
        fp = torch.zeros_like(masks[:1])
        fp[:, 10:60, 10:40] = 1
        n = len(target["labels"])
        targets.append(target)
        outputs.append(
            {
                "boxes": torch.cat(
                    [target["boxes"] + torch.tensor([shift, 0, shift, 0]),
                     torch.tensor([[10.0, 10.0, 40.0, 60.0]])]
                ),
                "labels": torch.ones(n + 1, dtype=torch.int64),
                "scores": torch.linspace(0.9, 0.5, n + 1),
                "masks": torch.cat([masks, fp])[:, None].float(),
            }
        )  # fmt: skip
    assert len(targets) == 50
    assert_same_numbers(targets, outputs)


def test_speed_benchmark_runs_and_compares(monkeypatch, capsys):
    """benchmarks/coco_metric_speed.py on 20 images (in this process: no second torch import):
    it times both backends and finds the same stats."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import coco_metric_speed

    monkeypatch.setattr(sys, "argv", ["coco_metric_speed.py", "--images", "20", "--repeats", "1"])
    coco_metric_speed.main()
    out = capsys.readouterr().out
    assert "ratio" in out
    differences = re.findall(r"max abs difference over the 12 stats (\S+)", out)
    assert len(differences) == 2 and all(float(d) <= STAT_TOL for d in differences)
