"""Scale jitter (augment: ssj/lsj) and copy-paste: what each does to an image and its target,
the same draws whatever the loader processes, exact mid-epoch resume, and ``data show --augment``.
Property-based tests (hypothesis) check that boxes, masks and keypoints stay consistent."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from conftest import make_pennfudan, run_main
from detfit.checkpoint import load_checkpoint
from detfit.config import RECIPES, TrainConfig, recipe_config
from detfit.data import PennFudanDataset, collate_fn, train_transforms
from detfit.data.copy_paste import CopyPaste, paste_objects
from detfit.data.loaders import build_datasets
from detfit.data.sampling import PerItemSeed
from detfit.data.synthetic import write_all_formats
from detfit.data.transforms import VISIBILITY_KEY, mask_extents, restore_keypoints, to_tv_tensors
from detfit.engine import Trainer
from detfit.errors import DetfitError
from test_trainer import SignalAt, assert_same_run, quiet_fit, tiny


def boxes_match_masks(target: dict) -> None:
    """Every box is its mask's extent, non-empty and inside the canvas."""
    masks, boxes = target["masks"], target["boxes"]
    height, width = masks.shape[-2:]
    assert torch.equal(mask_extents(masks), boxes.as_subclass(torch.Tensor))
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
    assert (boxes[:, 3] <= height).all()
    assert len(target["labels"]) == len(boxes) == len(masks) == len(target["iscrowd"])


def rectangles_target(height: int, width: int, rects: list[tuple[int, int, int, int]]) -> dict:
    masks = torch.zeros((len(rects), height, width), dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(rects):
        masks[k, y1:y2, x1:x2] = 1
    return {
        "boxes": mask_extents(masks),
        "masks": masks,
        "labels": torch.arange(1, len(rects) + 1),
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.zeros(len(rects), dtype=torch.uint8),
        "image_id": torch.tensor([7]),
    }


def test_mask_extents_count_pixel_edges_and_empty_masks_give_empty_boxes():
    masks = torch.zeros((2, 10, 12), dtype=torch.uint8)
    masks[0, 2:5, 3:9] = 1  # rows 2-4, columns 3-8
    assert mask_extents(masks).tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_copy_paste_hides_covered_pixels_recomputes_boxes_and_drops_hidden_objects():
    image = torch.zeros((3, 20, 30))
    # object 1: columns 0-19; object 2: columns 22-25 (covered completely by the paste)
    target = rectangles_target(20, 30, [(0, 0, 20, 20), (22, 5, 26, 10)])
    source_image = torch.ones((3, 20, 30))
    source = rectangles_target(20, 30, [(10, 0, 30, 20)])  # covers columns 10-29
    source["labels"] = torch.tensor([5])
    torch.manual_seed(0)
    out_image, out = paste_objects(image, target, source_image, source)
    assert out["labels"].tolist() == [1, 5]  # object 2 is gone, the pasted one last
    assert out["boxes"].tolist() == [[0.0, 0.0, 10.0, 20.0], [10.0, 0.0, 30.0, 20.0]]
    assert out["area"].tolist() == [200.0, 400.0]
    assert out_image[:, :, 10:].eq(1).all() and out_image[:, :, :10].eq(0).all()
    assert out["image_id"].tolist() == [7]
    boxes_match_masks(out)


def test_copy_paste_resizes_a_partner_of_another_size():
    target = rectangles_target(20, 30, [(0, 0, 5, 5)])
    source = rectangles_target(40, 60, [(20, 10, 60, 40)])  # the right two thirds, lower 3/4
    torch.manual_seed(0)
    out_image, out = paste_objects(torch.zeros(3, 20, 30), target, torch.ones(3, 40, 60), source)
    assert out_image.shape == (3, 20, 30)
    assert out["boxes"].tolist()[-1] == [10.0, 5.0, 30.0, 20.0]
    boxes_match_masks(out)


def test_lsj_gives_a_fixed_canvas_whose_boxes_are_the_masks_extents(synthetic_root):
    dataset = PennFudanDataset(synthetic_root, train_transforms(augment="lsj", canvas=96))
    items = PerItemSeed(dataset, seed=3)
    for i in range(len(items)):
        image, target = items[i]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        boxes_match_masks(target)
        assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())


def test_basic_is_what_training_always_drew(synthetic_root):
    """augment: basic builds the very transforms detfit had: the same draws, bit for bit."""
    cfg = TrainConfig(data_root=str(synthetic_root), num_test=3, photometric=True)
    data = build_datasets(cfg, log=lambda s: None)
    ours = PerItemSeed(data.train, seed=5)
    old = train_transforms(cfg.hflip_prob, cfg.photometric)
    assert repr(data.train.dataset.transforms) == repr(old)
    reference = PerItemSeed(
        torch.utils.data.Subset(PennFudanDataset(synthetic_root, old), data.train.indices), seed=5
    )
    for i in range(len(ours)):
        (a, ta), (b, tb) = ours[i], reference[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def augmented_config(root: Path, **changes) -> TrainConfig:
    return TrainConfig(
        data_root=str(root),
        num_test=3,
        augment="lsj",
        augment_size=80,
        copy_paste=1.0,
        photometric=True,
        **changes,
    )


def test_each_items_draws_do_not_depend_on_loader_workers_or_order(synthetic_root):
    data = build_datasets(augmented_config(synthetic_root), log=lambda s: None)
    assert isinstance(data.train, CopyPaste)
    items = PerItemSeed(data.train, seed=1)
    items.set_epoch(2)
    forward = [items[i] for i in range(len(items))]
    backward = [items[i] for i in reversed(range(len(items)))][::-1]
    loader = DataLoader(items, batch_size=2, num_workers=2, collate_fn=collate_fn)
    from_workers = [s for images, targets in loader for s in zip(images, targets)]
    pasted = 0
    for (a, ta), (b, tb), (c, tc) in zip(forward, backward, from_workers):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["masks"], tc["masks"])
        boxes_match_masks(ta)
        pasted += len(ta["labels"]) > 0
    assert pasted == len(forward)
    items.set_epoch(3)
    assert not torch.equal(items[0][0], forward[0][0])  # another epoch, other draws


def test_copy_paste_on_a_box_only_dataset_says_it_needs_masks(tmp_path, monkeypatch, capsys):
    yolo = write_all_formats(tmp_path / "sets", num_images=6)["yolo"]
    with pytest.raises(DetfitError, match="has boxes only, and copy-paste needs masks"):
        build_datasets(TrainConfig(dataset=f"yolo:{yolo}", copy_paste=0.5), log=lambda s: None)
    code, out, err = run_main(
        monkeypatch, capsys, "data", "show", f"yolo:{yolo}", "--out", tmp_path / "show",
        "--augment", "--set", "copy_paste=0.5",
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("detfit: error: copy_paste=0.5: yolo:") and "needs masks" in err
    # a recipe's own copy_paste is turned off on box-only data, with one line, not refused
    monkeypatch.setitem(RECIPES["cpu"], "copy_paste", 0.5)
    cfg, logs = recipe_config("cpu", dataset=f"yolo:{yolo}", model="fasterrcnn_resnet50_fpn"), []
    data = build_datasets(cfg, log=logs.append)
    assert cfg.copy_paste == 0.5 and not isinstance(data.train, CopyPaste)
    assert (
        f"yolo:{yolo} has boxes only: the cpu recipe's copy_paste is off (it needs masks)" in logs
    )


def test_data_show_augment_draws_the_training_samples(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "show"
    code, stdout, _ = run_main(
        monkeypatch, capsys, "data", "show", f"masks:{synthetic_root}", "--out", out, "--n", "4",
        "--augment", "--set", "augment=lsj", "--set", "copy_paste=1", "--set", "augment_size=64",
    )  # fmt: skip
    assert code == 0 and f"wrote {out / 'augmented.jpg'}" in stdout
    with Image.open(out / "augmented.jpg") as picture:
        assert picture.width > 400 and picture.height > 200


def test_a_resumed_run_with_lsj_and_copy_paste_is_exact(tmp_path):
    """Mid-epoch resume replays the same augmentations: the same weights as without the stop."""
    landscape_root = make_pennfudan(tmp_path / "data", num_images=9, size=(48, 80))
    augment = dict(augment="lsj", augment_size=64, copy_paste=0.5, photometric=True)
    whole = load_checkpoint(quiet_fit(tiny(landscape_root, tmp_path / "a", **augment)))
    run = tmp_path / "b"
    with pytest.raises(Exception, match="stopped by SIGTERM"):
        quiet_fit(tiny(landscape_root, run, **augment), callbacks=[SignalAt(4, signal.SIGTERM)])
    Trainer(resume=run, progress=False, log=lambda s: None).fit()
    assert_same_run(whole, load_checkpoint(run))


@st.composite
def scenes(draw):
    """An image with 1-4 rectangular objects (keypoints at their corners) and a source image."""
    height, width = draw(st.integers(8, 40)), draw(st.integers(8, 40))

    def rects(h, w):
        def one():
            return st.tuples(st.integers(0, w - 2), st.integers(0, h - 2)).flatmap(
                lambda xy: st.tuples(
                    st.just(xy[0]),
                    st.just(xy[1]),
                    st.integers(xy[0] + 1, w),
                    st.integers(xy[1] + 1, h),
                )  # fmt: skip
            )

        return st.lists(one(), min_size=1, max_size=4)

    sh, sw = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    return (
        height,
        width,
        draw(rects(height, width)),
        sh,
        sw,
        draw(rects(sh, sw)),
        draw(st.integers(0, 2**31)),
    )


def with_keypoints(target: dict) -> dict:
    boxes = target["boxes"]
    corners = torch.stack([boxes[:, :2], boxes[:, 2:] - 1], 1)  # [N, 2, 2]: inside the object
    target["keypoints"] = torch.cat([corners, torch.full((len(boxes), 2, 1), 2.0)], -1)
    return target


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes(), st.sampled_from(["ssj", "lsj"]))
def test_property_jitter_then_copy_paste_keep_boxes_masks_and_keypoints_consistent(scene, augment):
    height, width, rects, sh, sw, source_rects, seed = scene
    torch.manual_seed(seed)
    transform = train_transforms(hflip_prob=0.5, augment=augment, canvas=32)

    def augmented(h, w, rs):
        image = tv_tensors.Image(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
        image, target = to_tv_tensors(image, with_keypoints(rectangles_target(h, w, rs)))
        image, target = transform(image, target)
        assert VISIBILITY_KEY in target or not len(target["boxes"])
        return image, restore_keypoints(target)

    image, target = augmented(height, width, rects)
    assert image.shape == (3, 32, 32)
    boxes_match_masks(target)
    visible = target["keypoints"][..., 2] > 0
    xy = target["keypoints"][..., :2]
    inside = (xy >= 0).all(-1) & (xy[..., 0] < 32) & (xy[..., 1] < 32)
    assert (inside | ~visible).all()  # a visible keypoint is on the canvas
    source_image, source = augmented(sh, sw, source_rects)
    source["labels"] = source["labels"] + 100  # tells pasted objects from those underneath
    out_image, out = paste_objects(image, target, source_image, source)
    boxes_match_masks(out)
    assert out_image.shape == image.shape
    assert len(out["keypoints"]) == len(out["boxes"])
    below = out["labels"] < 100
    pasted = set(out["labels"][~below].tolist())
    assert pasted <= set(source["labels"].tolist()) and (pasted or not len(source["labels"]))
    cover = out["masks"][~below].bool().any(0)
    kps = out["keypoints"][below]
    x, y = kps[..., 0].long().clamp(0, 31), kps[..., 1].long().clamp(0, 31)
    assert not ((kps[..., 2] > 0) & cover[y, x]).any()  # no visible keypoint under a pasted one
    assert not (out["masks"][below].bool() & cover).any()  # pasted objects are on top
