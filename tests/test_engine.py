"""The engine: learning-rate schedules, the references' train_one_epoch/evaluate, fit() end to end
with an exact resume, and atomic, weights-only checkpoints."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import detfit.engine.trainer as trainer_module
from cocokit import (
    assert_scores_equal,
    pycocotools_scores,
    reference_scores,
    row_scores,
    run_model,
)
from conftest import SMALL, fit_until_second_evaluation, run_config
from detfit.checkpoint import load_checkpoint, rebuild_model, save_checkpoint
from detfit.config import TrainConfig
from detfit.data import PennFudanDataset, collate_fn, eval_transforms
from detfit.data.synthetic import make_pennfudan
from detfit.engine import evaluate, fit, train_one_epoch
from detfit.engine.builders import build_scheduler
from detfit.engine.step import MAX_NONFINITE_STEPS
from detfit.errors import DetfitError
from detfit.eval.coco import STAT_NAMES
from detfit.models import build_model

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def small_model(name: str = "maskrcnn_mobilenet_v2_fpn") -> nn.Module:
    torch.manual_seed(0)
    options = {k: v for k, v in SMALL.items() if name.startswith("mask") or "mask" not in k}
    return build_model(name, 2, weights=None, weights_backbone=None, **options)


def synthetic_loader(root: Path, indices, transforms=None, batch_size: int = 2) -> DataLoader:
    dataset = PennFudanDataset(root, transforms if transforms is not None else eval_transforms())
    return DataLoader(
        Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
    )


# ---------------------------------------------------------------- schedules


def lr_per_iteration(cfg: TrainConfig, iters_per_epoch: int) -> tuple[list[float], float]:
    """The lr each iteration trains with, and the lr left after the last one."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * iters_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer.param_groups[0]["lr"]


def test_step_schedule_with_warmup():
    cfg = TrainConfig(
        lr=0.1,
        warmup_iters=10,
        warmup_factor=0.001,
        lr_schedule="step",
        lr_step_size=3,
        lr_gamma=0.1,
        epochs=7,
    )
    lrs, _ = lr_per_iteration(cfg, 20)
    approx = pytest.approx
    assert lrs[0] == approx(1e-4, rel=1e-9)
    assert lrs[5] == approx(0.1 * (0.001 * 0.5 + 0.5), rel=1e-9)  # linear ramp
    assert lrs[9] == approx(0.1 * (0.001 * 0.1 + 0.9), rel=1e-9)
    assert lrs[10] == approx(0.1, rel=1e-12)
    assert lrs[59] == approx(0.1, rel=1e-12)  # last iteration of epoch 2
    assert lrs[60] == approx(0.01, rel=1e-9)  # epoch 3's first
    assert lrs[119] == approx(0.01, rel=1e-9)
    assert lrs[120] == approx(0.001, rel=1e-9)  # epoch 6
    assert lrs[139] == approx(0.001, rel=1e-9)
    assert lrs[:10] == sorted(lrs[:10])


def test_warmup_is_capped_at_the_first_epoch():
    cfg = TrainConfig(lr=0.1, warmup_iters=1000, lr_schedule="constant", epochs=2)
    lrs, after = lr_per_iteration(cfg, 20)
    assert lrs[0] == pytest.approx(1e-4, rel=1e-9)
    assert lrs[18] < 0.1
    assert lrs[19:] == [pytest.approx(0.1, rel=1e-12)] * 21
    assert after == pytest.approx(0.1)


def test_multistep_and_cosine_schedules():
    cfg = TrainConfig(
        lr=0.1,
        warmup_iters=0,
        lr_schedule="multistep",
        lr_milestones=[2, 5],
        lr_gamma=0.5,
        epochs=6,
    )
    lrs, _ = lr_per_iteration(cfg, 4)
    per_epoch = [lrs[4 * e] for e in range(6)]
    assert per_epoch == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.05, 0.025], rel=1e-12)

    cfg = TrainConfig(lr=0.1, warmup_iters=0, lr_schedule="cosine", epochs=7)
    lrs, after = lr_per_iteration(cfg, 20)
    assert lrs[0] == pytest.approx(0.1, rel=1e-12)
    assert lrs[70] == pytest.approx(0.05, rel=1e-9)  # half way
    assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 139 / 140)), rel=1e-9)
    assert lrs[-1] < 2e-5
    assert after == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_unknown_schedule_fails_before_training():
    # the settings refuse it when parsed, before any optimizer or scheduler exists
    with pytest.raises(DetfitError, match="'linearish'.*'step', 'multistep', 'cosine' or 'const"):
        TrainConfig(lr_schedule="linearish")


# ---------------------------------------------------------------- train_one_epoch


def test_train_one_epoch_references_warmup(synthetic_root):
    model = small_model()
    loader = synthetic_loader(synthetic_root, range(6))  # 3 iterations
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    used = []
    optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    first = params[0].detach().clone()

    # the references' call: positional model, optimizer, loader, device, epoch, print_freq
    stats = train_one_epoch(model, optimizer, loader, torch.device("cpu"), 0, 1)
    assert LOSS_KEYS | {"loss", "lr", "seconds", "seconds_per_iter", "skipped_steps"} == set(stats)
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["loss"] > 0 and stats["skipped_steps"] == 0.0
    assert stats["loss"] == pytest.approx(sum(stats[k] for k in LOSS_KEYS), rel=1e-6)
    assert not torch.equal(first, params[0])
    # LinearLR(start_factor=0.001, total_iters=len(loader) - 1): full lr on the last iteration
    assert used == pytest.approx([0.01 * 0.001, 0.01 * (0.001 + 0.999 / 2), 0.01], rel=1e-9)
    assert stats["lr"] == pytest.approx(0.01, rel=1e-12)  # so the lr after epoch 0 is the base

    # later epochs: no warm-up; uint8 images (no transforms) are converted for the model
    used.clear()
    raw = synthetic_loader(synthetic_root, range(4), transforms=lambda img, tgt: (img, tgt))
    assert next(iter(raw))[0][0].dtype == torch.uint8
    stats = train_one_epoch(model, optimizer, raw, "cpu", 1, 10, progress=False)
    assert used == pytest.approx([0.01, 0.01], rel=1e-12)
    assert all(math.isfinite(stats[k]) for k in LOSS_KEYS)


def fake_batches(n: int):
    image = torch.rand(3, 16, 16)
    target = {"boxes": torch.tensor([[1.0, 1.0, 8.0, 8.0]]), "labels": torch.tensor([1])}
    return [([image], [target]) for _ in range(n)]


def test_nonfinite_loss_stops_training(monkeypatch):
    model = nn.Linear(2, 2)
    calls = []

    def nan_forward(images, targets=None):
        calls.append(len(images))
        return {"loss": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(model, "forward", nan_forward)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipped steps keep the schedule going without a warning
        with pytest.raises(DetfitError) as info:
            train_one_epoch(model, optimizer, fake_batches(20), "cpu", 0, 10, progress=False)
    message = str(info.value)
    assert len(calls) == MAX_NONFINITE_STEPS
    assert "learning rate" in message and "nan" in message
    assert f"{MAX_NONFINITE_STEPS} iterations in a row" in message
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_isolated_nonfinite_losses_are_skipped(monkeypatch):
    model = nn.Linear(2, 2)
    pattern = [math.nan] * (MAX_NONFINITE_STEPS - 1) + [1.0] + [math.inf] * 2 + [1.0, math.nan]

    def forward(images, targets=None):
        value = pattern[len(seen)]
        seen.append(value)
        loss = model.weight.sum() * 0 + value if math.isfinite(value) else torch.tensor(value)
        return {"loss_fake": loss.requires_grad_() if not loss.requires_grad else loss}

    seen: list[float] = []
    monkeypatch.setattr(model, "forward", forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = train_one_epoch(
        model, optimizer, fake_batches(len(pattern)), "cpu", 1, 10, progress=False
    )
    assert len(seen) == len(pattern)
    assert stats["loss"] == 1.0  # the mean over the finite steps only
    assert stats["skipped_steps"] == float(sum(not math.isfinite(v) for v in pattern)) == 7.0


def test_loss_weights_scale_the_gradient_of_named_losses(monkeypatch):
    """loss_mask x 3 and loss_box x 1: one SGD step moves the weight by lr * (3 * 1 + 1 * 2)."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)

    def forward(images, targets=None):
        w = model.weight.sum()
        return {"loss_mask": w, "loss_box": 2 * w}

    monkeypatch.setattr(model, "forward", forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    one_step = functools.partial(train_one_epoch, model, optimizer, fake_batches(1), "cpu", 1)
    stats = one_step(progress=False, loss_weights={"loss_mask": 3.0})
    assert model.weight.item() == pytest.approx(1 - 0.1 * 5)
    # each loss is logged as the model computed it; "loss" is the weighted sum that was minimised
    assert stats["loss_mask"] == 1.0 and stats["loss_box"] == 2.0 and stats["loss"] == 5.0
    with pytest.raises(DetfitError, match=r"loss_weights: loss_msk not among .*loss_mask"):
        one_step(progress=False, loss_weights={"loss_msk": 2.0})


def test_a_step_skipped_by_the_amp_scaler_keeps_the_schedule_quietly(monkeypatch):
    """GradScaler skips optimizer.step() after an overflow; the lr schedule still advances and
    torch's "lr_scheduler.step() before optimizer.step()" warning is not shown."""
    model = nn.Linear(1, 1)

    class SkippingScaler:  # what GradScaler does on an overflow: no optimizer.step()
        def scale(self, loss):
            return loss

        def step(self, optimizer):
            pass

        def update(self):
            pass

    monkeypatch.setattr(model, "forward", lambda images, targets=None: {"loss": model.weight.sum()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_one_epoch(
            model,
            optimizer,
            fake_batches(2),
            "cpu",
            1,
            10,
            SkippingScaler(),
            lr_scheduler=scheduler,
            progress=False,
        )
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


# ---------------------------------------------------------------- evaluate


class Oracle(nn.Module):
    """Answers every image with its own ground truth (a mask model, for iou_types_for)."""

    def __init__(self, targets):
        super().__init__()
        self.queue = list(targets)
        self.roi_heads = SimpleNamespace(mask_predictor=nn.Identity())

    def forward(self, images):
        outputs = []
        for image in images:
            target = self.queue.pop(0)
            assert tuple(target["masks"].shape[-2:]) == tuple(image.shape[-2:])
            outputs.append(
                {
                    "boxes": target["boxes"].clone(),
                    "labels": target["labels"].clone(),
                    "scores": torch.linspace(1.0, 0.5, len(target["labels"])),
                    "masks": target["masks"][:, None].float(),
                }
            )
        return outputs


def test_evaluate_with_perfect_predictions(synthetic_root):
    loader = synthetic_loader(synthetic_root, range(8), batch_size=3)
    targets = [t for _, batch in loader for t in batch]
    result = evaluate(Oracle(targets), loader, "cpu", progress=False, verbose=False)
    assert result.num_images == 8
    assert set(result.stats) == set(result.coco_eval) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert result.stats[iou_type]["AP"] == pytest.approx(1.0, abs=1e-12)
        assert result.stats[iou_type]["AR100"] == pytest.approx(1.0, abs=1e-12)
        stats = result.coco_eval[iou_type].stats
        assert len(stats) == 12
        assert list(stats) == [result.stats[iou_type][n] for n in STAT_NAMES]


@pytest.mark.parametrize(
    ("name", "iou_types"),
    [("maskrcnn_mobilenet_v2_fpn", {"bbox", "segm"}), ("fasterrcnn_mobilenet_v2_fpn", {"bbox"})],
)
def test_evaluate_a_model(name, iou_types, synthetic_root):
    """``evaluate`` as the references call it, on ground truth made from the model's own top
    detections moved by a pixel (so that AP is well above 0 and below 1): every number equals
    pycocotools run directly on the same detections."""
    model = small_model(name)
    if name.startswith("mask"):  # untrained mask logits sit near 0: lift them over the threshold
        nn.init.constant_(model.roi_heads.mask_predictor.mask_fcn_logits.bias, 2.0)
    images = [image for batch, _ in synthetic_loader(synthetic_root, range(3)) for image in batch]
    outputs = run_model(model, images)
    samples = []
    for k, (image, out) in enumerate(zip(images, outputs)):
        keep = out["scores"] > 0
        if "masks" in out:  # a mask that thresholds to nothing could not be matched
            keep &= (out["masks"][:, 0] > 0.5).flatten(1).any(1)
        top = keep.nonzero().flatten()[:3]
        assert len(top), "the untrained model still detects something at score > 0"
        target = {
            "boxes": out["boxes"][top] + torch.tensor([1.0, 0.0, 1.0, 0.0]),
            "labels": out["labels"][top],
            "image_id": k,
        }
        if "masks" in out:
            target["masks"] = (out["masks"][top, 0] > 0.5).to(torch.uint8).roll(1, dims=-1)
        samples.append((image, target))
    loader = [
        ([s[0] for s in samples[:2]], [s[1] for s in samples[:2]]),
        ([samples[2][0]], [samples[2][1]]),
    ]
    result = evaluate(model, loader, torch.device("cpu"))  # the references' call
    assert set(result.stats) == set(result.coco_eval) == iou_types
    assert result.num_images == 3 and result.seconds > 0
    assert not model.training
    # no class names given: per-class APs are named by category id
    reference = pycocotools_scores(outputs, samples, sorted(iou_types), ["__background__", "1"])
    for iou_type in iou_types:
        stats = result.coco_eval[iou_type].stats
        assert list(result.stats[iou_type]) == list(STAT_NAMES)
        assert list(stats) == [result.stats[iou_type][n] for n in STAT_NAMES]
        assert 0.2 < result.stats[iou_type]["AP"] < 1.0
        per_class = {f"AP/{c}": ap for c, ap in result.per_class[iou_type].items()}
        assert_scores_equal({**result.stats[iou_type], **per_class}, reference[iou_type])


# ---------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def landscape_root(tmp_path_factory) -> Path:
    """Synthetic images wider than high (48-60 x 60-100 px).

    torchvision's MultiScaleRoIAlign infers its feature-map scales from the first batch it sees
    and keeps them. At TINY sizes a portrait image padded to a multiple of 32 (e.g. 66 -> 96 px
    high) makes it infer twice the real scale, so a resumed model, whose first batch differs,
    could pool differently. Landscape images are all resized to 46-64 px high, padded to 64:
    the inferred scales are the true ones whatever the first batch.
    """
    return make_pennfudan(tmp_path_factory.mktemp("landscape"), num_images=8, size=(48, 80))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, landscape_root):
    """Two uninterrupted epochs (run A)."""
    cfg = run_config(landscape_root, tmp_path_factory.mktemp("fit") / "run")
    logs: list[str] = []
    run_dir = fit(cfg, progress=False, log=logs.append)
    return cfg, run_dir, logs


STAT_COLUMNS = [f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES]


def deterministic(row: dict) -> dict:
    """A metrics row without its timings and memory figures."""
    return {
        k: v
        for k, v in row.items()
        if k == "epoch"
        or k.startswith(("train_loss", "train_lr", "train_skipped", "bbox_", "segm_"))
    }


def test_fit_writes_a_complete_run_folder(full_run):
    cfg, run_dir, logs = full_run
    assert run_dir == Path(cfg.out)
    assert TrainConfig.load(run_dir / "config.yaml") == cfg
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]

    history = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]  # counted from 1, as the log lines
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, json_row in zip(rows, history, strict=True):
        assert set(STAT_COLUMNS) <= set(row) and set(STAT_COLUMNS) <= set(json_row)
        for column in STAT_COLUMNS + ["train_loss", "train_lr"]:
            assert float(row[column]) == json_row[column], column
        assert math.isfinite(json_row["train_loss"]) and json_row["train_loss"] > 0
    # the last epoch's numbers are pycocotools' on the detections of the weights saved
    reference = reference_scores(run_dir / "last.pt")
    for iou_type in ("bbox", "segm"):
        assert_scores_equal(row_scores(history[-1], iou_type), reference[iou_type])

    last = load_checkpoint(run_dir / "last.pt")
    assert load_checkpoint(run_dir)["epoch"] == last["epoch"] == 2
    assert last["config"] == cfg.to_dict()
    assert last["history"] == history
    assert last["metric_key"] == "segm_AP"
    assert last["model_info"]["name"] == "maskrcnn_mobilenet_v2_fpn"
    assert last["model_info"]["classes"] == ["__background__", "person"]
    best = load_checkpoint(run_dir / "best.pt")
    aps = [row["segm_AP"] for row in history]
    assert best["epoch"] == aps.index(max(aps)) + 1
    assert last["callbacks"]["Checkpointer"]["best"] == max(aps)
    # best.pt: the weights prediction and export need, not the optimizer's state
    assert set(best) == {
        "model",
        "train_model",
        "model_info",
        "config",
        "history",
        "metric_key",
        "epoch",
        "global_step",
    } & set(last)
    assert "optimizer" in last and "optimizer" not in best
    assert (run_dir / "best.pt").stat().st_size < 0.6 * (run_dir / "last.pt").stat().st_size
    assert last["world_size"] == history[0]["world_size"] == 1
    assert history[0]["global_batch_size"] == cfg.batch_size
    model = rebuild_model(last["model_info"], last["model"])
    assert sum(p.numel() for p in model.parameters()) > 0
    assert [line.split(":")[0] for line in logs if line.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]


def test_resume_reproduces_the_uninterrupted_run(full_run, tmp_path):
    cfg_a, run_a, _ = full_run
    cfg = run_config(Path(cfg_a.data_root), tmp_path / "run_b")

    fit_until_second_evaluation(cfg)
    run_b = Path(cfg.out)
    assert load_checkpoint(run_b)["epoch"] == 1
    assert len(json.loads((run_b / "metrics.json").read_text())) == 1

    logs: list[str] = []
    assert fit(resume=run_b, progress=False, log=logs.append) == run_b
    assert f"resuming {run_b} after epoch 1 (of 2 epochs)" in logs

    a, b = load_checkpoint(run_a), load_checkpoint(run_b)
    assert b["epoch"] == 2
    assert list(a["model"]) == list(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    slots_a, slots_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert len(slots_a) == len(slots_b) > 0
    for slot_a, slot_b in zip(slots_a.values(), slots_b.values(), strict=True):
        assert torch.equal(slot_a["momentum_buffer"], slot_b["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert [deterministic(r) for r in a["history"]] == [deterministic(r) for r in b["history"]]
    history_b = json.loads((run_b / "metrics.json").read_text())
    assert [row["epoch"] for row in history_b] == [1, 2]
    assert TrainConfig.load(run_b / "config.yaml") == cfg


def test_ema_is_what_is_evaluated_saved_and_resumed(landscape_root, tmp_path):
    """With ema_decay, the averaged weights are evaluated and saved as "model"; the raw ones
    travel as "train_model", and a resumed run ends with both equal to an uninterrupted run's."""

    def ema_config(out: Path) -> TrainConfig:
        return run_config(landscape_root, out).replace(ema_decay=0.9, max_iters_per_epoch=2)

    run_a = fit(ema_config(tmp_path / "a"), progress=False, log=lambda s: None)
    a = load_checkpoint(run_a / "last.pt")
    assert a["callbacks"]["EMA"]["updates"] == 4  # 2 epochs x 2 steps
    floats = [k for k, v in a["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(a["model"][k], a["train_model"][k]) for k in floats)
    # the metrics are the averaged model's: evaluating "model" again reproduces them
    cfg = ema_config(tmp_path / "unused")
    data = trainer_module.build_datasets(cfg, log=lambda s: None)
    test_loader = trainer_module.build_loaders(cfg, data).test
    model = rebuild_model(a["model_info"], a["model"])
    result = evaluate(model, test_loader, "cpu", progress=False, verbose=False)
    assert result.stats["segm"]["AP"] == a["history"][-1]["segm_AP"]

    fit_until_second_evaluation(ema_config(tmp_path / "b"))
    b = load_checkpoint(fit(resume=tmp_path / "b", progress=False, log=lambda s: None) / "last.pt")
    assert b["callbacks"]["EMA"]["updates"] == 4
    for key in ("model", "train_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


# ---------------------------------------------------------------- checkpoints


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_info": {"name": "x"}, "epoch": 0})
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    new = {"model": {"w": torch.zeros(3)}, "model_info": {"name": "x"}, "epoch": 1}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, new)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "best.pt", new)  # a first write leaves nothing behind
    assert os.listdir(tmp_path) == ["last.pt"]
    monkeypatch.undo()

    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 0 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    save_checkpoint(path, new)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


EXECUTED: list[str] = []


def _record(value):
    EXECUTED.append(value)
    return value


class Sneaky:
    def __reduce__(self):
        return (_record, ("code ran",))


def test_load_checkpoint_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(DetfitError) as info:
        load_checkpoint(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)

    with pytest.raises(DetfitError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(DetfitError, match="last.pt: checkpoint not found"):
        load_checkpoint(tmp_path)  # a run folder without last.pt

    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(1)}, plain)
    with pytest.raises(DetfitError, match="not a detfit checkpoint"):
        load_checkpoint(plain)

    sneaky = tmp_path / "sneaky.pt"
    torch.save({"model": {}, "model_info": {}, "extra": Sneaky()}, sneaky)
    EXECUTED.clear()
    with pytest.raises(DetfitError) as info:
        load_checkpoint(sneaky)
    assert str(sneaky) in str(info.value) and "\n" not in str(info.value)
    assert EXECUTED == []  # weights_only: nothing from the file ran


def test_train_seconds_stop_where_training_stops(synthetic_root, tmp_path):
    """``train_seconds`` (and so ``train_seconds_per_iter``) count the epoch's training, not the
    evaluation after it: a callback that spends 2 s on evaluation adds nothing to them."""
    import time

    from detfit.engine.callbacks import Callback
    from detfit.engine.trainer import Trainer

    class Clock(Callback):
        def on_epoch_start(self, trainer) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, trainer, result) -> None:
            self.last_step = time.perf_counter()

        def on_evaluation(self, trainer, result) -> None:
            time.sleep(2.0)

    cfg = run_config(synthetic_root, tmp_path / "run")
    cfg.epochs, cfg.max_iters_per_epoch = 1, 2
    clock = Clock()
    trainer = Trainer(cfg, callbacks=[clock], progress=False, log=lambda _: None)
    trainer.fit()
    row = trainer.history[-1]
    # the margin covers leaving the loader after the last step, not the 2 s of evaluation
    assert 0 < row["train_seconds"] <= clock.last_step - clock.start + 0.75
    assert row["train_seconds_per_iter"] == pytest.approx(row["train_seconds"] / 2)
