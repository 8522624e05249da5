"""What the pictures show: results.png's series are metrics.csv's, PR curves are COCOeval's
precision table, the confusion matrix counts a hand-made case right, galleries draw what was
scored; files have the expected size, are not blank and are written atomically. Also the
validation loss (which must not change training) and ``detfit eval``'s pictures and JSON."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_config, run_main
from detfit.checkpoint import load_checkpoint
from detfit.engine import fit
from detfit.engine.step import NOT_LOSSES, LossMeter
from detfit.eval.coco import STAT_NAMES, CocoEvaluator
from detfit.eval.confusion import best_f1_threshold, confusion_matrix
from detfit.plots import plot_confusion, plot_gallery, plot_pr, plot_results, plot_runs, pr_curves
from detfit.plots.confusion import display_order, normalised
from detfit.plots.curves import PANEL_SIZE, TITLE_SPACE, read_metrics
from detfit.plots.figure import DPI, figure_array
from detfit.plots.gallery import CELL, draw_output, outputs_from_results, samples_from_evaluation
from test_eval_coco import imperfect_outputs, make_targets

CLASSES = ["__background__", "cat", "dog"]
RUN_PICTURES = (
    "results.png",
    "pr_curve_bbox.png",
    "pr_curve_segm.png",
    "confusion_matrix.png",
    "val_predictions.jpg",
)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_not_blank(image: np.ndarray) -> None:
    assert image.std() > 20, "nearly one colour"
    colours = image.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    assert len(np.unique(colours)) > 50, "too few colours for a picture"


def csv_columns(run: Path) -> dict[str, list[float]]:
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def test_run_folder_pictures(plotted_run):
    for name in RUN_PICTURES:
        assert_not_blank(pixels(plotted_run / name))
    assert not list(plotted_run.glob(".*.tmp"))  # written through temporary files, renamed
    columns = csv_columns(plotted_run)
    losses = [k for k in columns if k.startswith("train_") and k[6:] not in NOT_LOSSES]
    panels = len(losses) + 1 + 2  # each loss, the lr, bbox and segm AP
    rows = -(-panels // 5)
    height, width = pixels(plotted_run / "results.png").shape[:2]
    assert (width, height) == (
        round(5 * PANEL_SIZE[0] * DPI),
        round((rows * PANEL_SIZE[1] + TITLE_SPACE) * DPI),
    )
    # 3 test images: 2 pairs (ground truth | predicted) on the first row, 1 on the second
    height, width = pixels(plotted_run / "val_predictions.jpg").shape[:2]
    assert (width, height) == (round(4 * CELL[0] * DPI), round((2 * CELL[1] + 0.5) * DPI))


def test_results_series_are_metrics_csv(plotted_run):
    columns = csv_columns(plotted_run)
    assert "val_loss" in columns and "val_loss_mask" in columns  # val_loss: true
    fig = plot_results(read_metrics(plotted_run), best_key="segm_AP")
    drawn = {}
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        title = ax.get_title()
        for line in ax.get_lines():
            label = line.get_label()
            if label == "best":
                continue
            if title.startswith("loss"):
                name = "loss" if title.startswith("loss (") else title
                key = f"{label}_{name}"
            elif title.startswith("learning rate"):
                key = "train_lr"
            else:
                key = f"{title.split()[0]}_{label}"
            drawn[key] = (list(line.get_xdata()), list(line.get_ydata()))
    expected = [k for k in columns if k.startswith(("train_loss", "val_loss"))]
    expected += ["train_lr"] + [
        f"{t}_{n}" for t in ("bbox", "segm") for n in ("AP", "AP50", "AP75")
    ]
    assert sorted(drawn) == sorted(expected)
    for key, (x, y) in drawn.items():
        assert x == columns["epoch"] and y == columns[key], key  # exactly the file's numbers
    # and the file in the run folder is that figure, pixel for pixel
    title = f"{plotted_run.name} (maskrcnn_mobilenet_v2_fpn)"
    again = figure_array(plot_results(read_metrics(plotted_run), title, best_key="segm_AP"))
    assert np.array_equal(again, pixels(plotted_run / "results.png"))


def test_loss_columns_are_what_the_meter_reports():
    from detfit.engine.step import StepResult

    meter = LossMeter()
    meter.add(StepResult({"loss_a": 1.0}, 1.0, skipped=False, stop=False))
    assert set(meter.summary(0.1)) - {"loss_a", "loss"} == set(NOT_LOSSES)


def test_detfit_plot_compares_runs(plotted_run, tmp_path, monkeypatch, capsys):
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    rows = json.loads((plotted_run / "metrics.json").read_text())
    for row in rows:
        row["bbox_AP"] = 0.25 * row["epoch"]
    with (other / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mine = tmp_path / "runs" / "mine"
    shutil.copytree(plotted_run, mine, ignore=shutil.ignore_patterns("*.pt", "tensorboard"))
    code, out, err = run_main(monkeypatch, capsys, "plot", mine, other)
    assert code in (None, 0), err
    assert out.strip() == f"wrote {tmp_path / 'runs' / 'compare.png'}"
    assert_not_blank(pixels(tmp_path / "runs" / "compare.png"))
    fig = plot_runs({"mine": read_metrics(mine), "other": read_metrics(other)})
    ap = next(ax for ax in fig.axes if ax.get_title() == "bbox AP")
    lines = {line.get_label(): list(line.get_ydata()) for line in ap.get_lines()}
    assert lines == {"mine": csv_columns(mine)["bbox_AP"], "other": [0.25, 0.5]}
    code, _, err = run_main(monkeypatch, capsys, "plot", tmp_path / "nothing")
    assert code == 2 and "nothing/metrics.csv: not found" in err


@pytest.fixture(scope="module")
def scored():
    """An evaluator over the hand-made targets and imperfect detections of test_eval_coco."""
    targets, outputs = make_targets(), imperfect_outputs(make_targets())
    evaluator = CocoEvaluator(("bbox", "segm"), classes=CLASSES)
    evaluator.process(targets, outputs, [tuple(t["masks"].shape[-2:]) for t in targets])
    evaluator.evaluate()
    return evaluator, targets, outputs


def test_pr_curves_are_cocoeval_precision(scored):
    evaluator, _, _ = scored
    for iou_type in ("bbox", "segm"):
        coco_eval = evaluator.coco_eval[iou_type]
        precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
        curves = pr_curves(coco_eval, CLASSES)
        assert list(curves.at_50) == ["cat", "dog"]
        fig = plot_pr(curves)
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        for k, name in enumerate(["cat", "dog"]):
            assert np.array_equal(curves.at_50[name], precision[0, :, k, 0, -1])
            assert np.array_equal(curves.mean[name], precision[:, :, k, 0, -1].mean(axis=0))
            assert curves.ap(name) == pytest.approx(evaluator.per_class[iou_type][name], abs=1e-12)
            label = next(label for label in lines if label.startswith(f"{name} "))
            assert np.array_equal(lines[label].get_ydata(), precision[0, :, k, 0, -1])
            assert np.array_equal(lines[label].get_xdata(), coco_eval.params.recThrs)
        every = next(line for label, line in lines.items() if label.startswith("all classes"))
        assert np.allclose(every.get_ydata(), precision[0, :, :, 0, -1].mean(axis=1))
        assert np.mean(list(curves.mean.values()), axis=0).mean() == pytest.approx(
            coco_eval.stats[0], abs=1e-12
        )


def box(x0, y0, x1, y1):
    return [x0, y0, x1 - x0, y1 - y0]


def test_confusion_matrix_counts_a_hand_made_case():
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": box(0, 0, 10, 10)},  # cat A
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": box(20, 0, 30, 10)},  # dog B
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": box(0, 20, 10, 30)},  # cat C
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": box(50, 50, 90, 90), "iscrowd": 1},
            {"id": 5, "image_id": 2, "category_id": 2, "bbox": box(0, 0, 10, 10)},  # dog D
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": box(0, 0, 10, 10), "score": 0.9},  # A: right
        {"image_id": 1, "category_id": 2, "bbox": box(0, 0, 10, 9), "score": 0.95},  # on A: dog
        {"image_id": 1, "category_id": 1, "bbox": box(20, 0, 30, 10), "score": 0.7},  # B as cat
        {"image_id": 1, "category_id": 1, "bbox": box(0, 24, 10, 34), "score": 0.8},  # C: IoU .43
        {"image_id": 1, "category_id": 1, "bbox": box(60, 60, 70, 70), "score": 0.9},  # crowd
        {"image_id": 1, "category_id": 2, "bbox": box(40, 0, 45, 5), "score": 0.2},  # too low
        {"image_id": 2, "category_id": 1, "bbox": box(30, 30, 40, 40), "score": 0.6},  # nothing
    ]
    matrix = confusion_matrix(gt, dets, 3)
    # rows: ground truth background (false positives), cat, dog; columns: predicted bg, cat, dog
    expected = np.array(
        [
            [0, 2, 1],  # cat on C's side (IoU 0.43) and on nothing; the dog beside A
            [1, 1, 0],  # cat A found; cat C missed
            [1, 1, 0],  # dog B called a cat; dog D missed
        ]
    )
    assert np.array_equal(matrix, expected)
    assert matrix.sum() == 4 + 3 + 0  # 4 non-crowd objects, 3 false positives
    fig = plot_confusion(matrix, CLASSES, "hand-made")
    counts, shares = (ax.get_images()[0].get_array() for ax in fig.axes[:2])
    assert np.array_equal(counts, display_order(expected))
    assert np.allclose(shares, display_order(normalised(expected)))
    assert np.allclose(display_order(normalised(expected))[-1], [2 / 3, 1 / 3, 0])  # bg last
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["1", "0", "1", "1", "0", "1", "2", "1"]  # row by row, bg/bg left out


def test_best_f1_threshold():
    gt = {
        "images": [{"id": 1}],
        "annotations": [
            {"id": k, "image_id": 1, "category_id": 1, "bbox": box(20 * k, 0, 20 * k + 10, 10)}
            for k in range(3)
        ],
    }

    def det(k, score, label=1):  # on object k (k >= 3: on nothing)
        return {"image_id": 1, "category_id": label, "bbox": box(20 * k, 0, 20 * k + 10, 10),
                "score": score}  # fmt: skip

    # found, found, false, found, false, false: F1 .5 .8 .67 .86 .75 .67 -> best from 0.6 on
    dets = [det(0, 0.9), det(1, 0.8), det(5, 0.7), det(2, 0.6), det(6, 0.3), det(0, 0.2)]
    assert best_f1_threshold(gt, dets) == 0.6
    assert best_f1_threshold(gt, dets[:2] + [det(2, 0.95, label=2)]) == 0.8  # wrong class: false
    assert best_f1_threshold(gt, []) == 0.5  # nothing to go by: predict's default


def test_an_image_without_detections_is_drawn():
    output = outputs_from_results({"bbox": [], "segm": [], "keypoints": []}, 20, 30)
    assert output["boxes"].shape == (0, 4) and output["masks"].shape == (0, 1, 20, 30)
    assert output["keypoints"].shape == (0, 0, 3)
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    assert torch.equal(draw_output(image, output, CLASSES), image)


def test_gallery_draws_what_was_scored(scored):
    evaluator, targets, outputs = scored
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *t["masks"].shape[-2:]), generator=gen) for t in targets]
    dataset = [(im.to(torch.uint8), t) for im, t in zip(images, targets)]
    samples = samples_from_evaluation(evaluator, dataset, range(len(dataset)))
    for sample, output in zip(samples, outputs):
        assert torch.equal(sample.output["labels"], output["labels"])
        assert torch.allclose(sample.output["boxes"], output["boxes"], atol=1e-4)
        assert torch.allclose(sample.output["scores"], output["scores"])
        assert torch.equal(sample.output["masks"] > 0.5, output["masks"] > 0.5)
    fig = plot_gallery(samples, CLASSES, "three images")
    shown = [ax for ax in fig.axes if ax.get_images()]
    assert len(shown) == 6  # ground truth and predictions of each image
    assert [ax.get_title().split(":")[0] for ax in shown[::2]] == [
        "image 3",
        "image 5",
        "image 9",
    ]  # no files
    image = figure_array(fig)
    assert image.shape == (round((2 * CELL[1] + 0.5) * DPI), round(4 * CELL[0] * DPI), 3)
    assert_not_blank(image)


def test_validation_loss_leaves_training_unchanged(plotted_run, synthetic_root, tmp_path):
    """The plotted run had val_loss, plots and TensorBoard on; without them, training is the
    same to the last bit (the losses' random draws come from a forked RNG)."""
    plain = fit(run_config(synthetic_root, tmp_path / "plain"), progress=False, log=lambda s: None)
    with_all, without = (
        json.loads((plotted_run / "metrics.json").read_text()),
        json.loads((plain / "metrics.json").read_text()),
    )
    for a, b in zip(with_all, without):
        for key in b:
            if key.startswith(("train_loss", "bbox_", "segm_")):
                assert a[key] == b[key], key
    first, second = load_checkpoint(plotted_run / "last.pt"), load_checkpoint(plain / "last.pt")
    for name, tensor in second["model"].items():
        assert torch.equal(first["model"][name], tensor), name
    assert not (plain / "results.png").exists()  # plots: false
    assert all(np.isfinite(row["val_loss"]) and row["val_loss"] > 0 for row in with_all)


def test_eval_pictures_json_and_quiet_output(plotted_run, synthetic_root, monkeypatch, capsys):
    report = plotted_run / "stats.json"
    code, out, err = run_main(
        monkeypatch, capsys, "eval", plotted_run / "best.pt", "--device", "cpu", "--json", report
    )
    assert code in (None, 0), err
    assert "scoring 3 images: the run's held-out split" in err
    for chatter in ("index created", "Loading and preparing results", "DONE (t=", "creating index"):
        assert chatter not in out + err
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in out  # the summary table stays
    stats = json.loads(report.read_text())
    for iou_type in ("bbox", "segm"):
        assert list(stats[iou_type]) == [*STAT_NAMES, "AP/person"]
    pictures = plotted_run / "eval-best"
    for name in ("pr_curve_bbox.png", "pr_curve_segm.png", "confusion_matrix.png"):
        assert_not_blank(pixels(pictures / name))
    assert (pictures / "val_predictions.jpg").is_file()
    # --data naming a set without a split: every image of it is scored, and said so
    code, _, err = run_main(
        monkeypatch, capsys, "eval", plotted_run / "best.pt", "--device", "cpu",
        "--data", f"pennfudan:{synthetic_root}", "--no-plots",
    )  # fmt: skip
    assert code in (None, 0), err
    assert f"scoring 8 images: every image of pennfudan:{synthetic_root}" in err
    # --split train: the other part of the run's seeded split, the 5 images it trained on
    train_report = plotted_run / "train-stats.json"
    code, _, err = run_main(
        monkeypatch, capsys, "eval", plotted_run / "best.pt", "--device", "cpu",
        "--split", "train", "--no-plots", "--json", train_report,
    )  # fmt: skip
    assert code in (None, 0), err
    assert "scoring 5 images: the run's training images (the seeded split's other part)" in err
    assert json.loads(train_report.read_text())["bbox"]  # the report is written
    from detfit.config import TrainConfig
    from detfit.data.batching import split_indices
    from detfit.eval.saved import evaluate_checkpoint

    cfg = TrainConfig.load(plotted_run / "config.yaml")
    trained_on, held_out = split_indices(8, cfg.num_test, cfg.split_seed)
    quiet = {"device": "cpu", "progress": False, "verbose": False, "log": lambda line: None}
    for split, indices in (("train", trained_on), ("test", held_out)):
        result = evaluate_checkpoint(plotted_run / "best.pt", split=split, **quiet)
        assert sorted(result.coco_eval["bbox"].params.imgIds) == sorted(indices), split
    code, _, err = run_main(
        monkeypatch, capsys, "eval", plotted_run / "best.pt", "--split", "val", "--no-plots"
    )
    assert code == 2 and "no val split (train and test are the seeded split" in err
