"""v2 presets (detfit.data.transforms) and the tutorial-compatible T module (detfit.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detfit import transforms as T
from detfit.data.pennfudan import PennFudanDataset
from detfit.data.transforms import eval_transforms, per_instance_tensors, train_transforms


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


@pytest.fixture(scope="module")
def dataset(synthetic_root):
    return PennFudanDataset(synthetic_root)


def _multi_instance_item(dataset):
    for i in range(len(dataset)):
        image, target = dataset[i]
        if len(target["boxes"]) >= 2:
            return image, target
    raise AssertionError("synthetic data has no image with two instances")


# --- train / eval presets ---------------------------------------------------------------------


def test_train_hflip(dataset):
    image, target = _multi_instance_item(dataset)
    h, w = image.shape[-2:]
    out_image, out = train_transforms(hflip_prob=1.0)(image, target)

    assert type(out_image) is torch.Tensor  # ToPureTensor: plain tensors for the model
    assert out_image.dtype == torch.float32
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0
    assert out_image.max() > 0.4  # scaled from uint8, not left in 0..255 nor all zero
    assert torch.allclose(out_image, torch.flip(_plain(image), [-1]).float() / 255)

    assert type(out["masks"]) is torch.Tensor
    assert out["masks"].dtype == torch.uint8
    assert torch.equal(out["masks"], torch.flip(_plain(target["masks"]), [-1]))

    boxes = _plain(target["boxes"])
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert type(out["boxes"]) is torch.Tensor
    assert torch.equal(out["boxes"], torch.stack([w - x1, y0, w - x0, y1], -1))
    # masks_to_boxes gives the last pixel's index (x1 inclusive) while v2 flips boxes as
    # continuous coordinates (x -> W - x), so after a flip the boxes sit exactly one pixel right of
    # masks_to_boxes(flipped masks); rows are untouched and agree exactly.
    from_masks = masks_to_boxes(out["masks"])
    assert torch.equal(out["boxes"][:, [1, 3]], from_masks[:, [1, 3]])
    assert torch.equal(out["boxes"][:, [0, 2]] - from_masks[:, [0, 2]], torch.ones(len(boxes), 2))

    for key in ("labels", "area", "iscrowd", "image_id"):
        assert out[key].dtype == target[key].dtype
        assert torch.equal(out[key], target[key]), key


def test_train_no_flip_keeps_geometry(dataset):
    image, target = dataset[0]
    out_image, out = train_transforms(hflip_prob=0.0)(image, target)
    assert torch.allclose(out_image, _plain(image).float() / 255)
    assert torch.equal(out["boxes"], _plain(target["boxes"]))
    assert torch.equal(out["boxes"], masks_to_boxes(out["masks"]))


def test_photometric_changes_pixels_not_geometry(dataset):
    image, target = dataset[1]
    torch.manual_seed(0)
    tf = train_transforms(hflip_prob=0.0, photometric=True)
    outs = [tf(image, target) for _ in range(6)]
    plain = _plain(image).float() / 255
    assert any(not torch.allclose(out_image, plain) for out_image, _ in outs)
    for out_image, out in outs:
        assert out_image.dtype == torch.float32
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0
        assert torch.equal(out["boxes"], _plain(target["boxes"]))
        assert torch.equal(out["masks"], _plain(target["masks"]))


def test_resize_keeps_boxes_on_masks(dataset):
    tf = v2.Compose([v2.ToImage(), v2.Resize((40, 50)), v2.ToDtype(torch.float32, scale=True)])
    worst = 0.0
    for i in range(len(dataset)):
        image, target = dataset[i]
        h, w = image.shape[-2:]
        out_image, out = tf(image, target)
        n = len(target["boxes"])
        assert out_image.shape == (3, 40, 50)
        assert out["masks"].shape == (n, 40, 50)
        assert out["masks"].dtype == torch.uint8
        assert tuple(out["boxes"].canvas_size) == (40, 50)
        scale = torch.tensor([50 / w, 40 / h, 50 / w, 40 / h])
        assert torch.allclose(_plain(out["boxes"]), _plain(target["boxes"]) * scale, atol=1e-4)
        diff = (_plain(out["boxes"]) - masks_to_boxes(_plain(out["masks"]))).abs().max().item()
        worst = max(worst, diff)
    assert worst <= 1.5


def _with_degenerate_instance(dataset):
    """A real item plus one 1-pixel-wide instance, whose masks_to_boxes box has x1 == x0."""
    image, target = dataset[0]
    h, w = image.shape[-2:]
    masks = _plain(target["masks"])
    extra = torch.zeros((1, h, w), dtype=torch.uint8)
    extra[0, 5:30, 3] = 1
    masks = torch.cat([extra, masks])
    boxes = masks_to_boxes(masks)
    n = len(boxes)
    assert boxes[0].tolist() == [3.0, 5.0, 3.0, 29.0]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(1, n + 1),
        "image_id": target["image_id"],
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + 0.5,
        "iscrowd": torch.tensor([1] + [0] * (n - 1), dtype=torch.uint8),
        "masks": tv_tensors.Mask(masks),
    }
    return image, target


@pytest.mark.parametrize(
    "transform",
    [
        v2.SanitizeBoundingBoxes(labels_getter=per_instance_tensors),
        train_transforms(hflip_prob=0.0),
    ],
    ids=["sanitize", "train_transforms"],
)
def test_sanitize_drops_degenerate_box_with_its_fields(dataset, transform):
    image, target = _with_degenerate_instance(dataset)
    _, out = transform(image, target)
    n = len(target["boxes"])
    assert torch.equal(_plain(out["boxes"]), _plain(target["boxes"])[1:])
    assert out["labels"].tolist() == list(range(2, n + 1))
    assert torch.equal(out["area"], target["area"][1:])
    assert out["iscrowd"].tolist() == [0] * (n - 1)
    assert torch.equal(_plain(out["masks"]), _plain(target["masks"])[1:])
    assert torch.equal(out["image_id"], target["image_id"])  # per-image, not per-instance


def test_t_sanitize_on_plain_targets(dataset):
    image, target = _with_degenerate_instance(dataset)
    plain = {k: _plain(v) for k, v in target.items()}
    _, out = T.SanitizeBoundingBoxes()(_plain(image), plain)
    assert out["labels"].tolist() == list(range(2, len(plain["labels"]) + 1))
    assert torch.equal(_plain(out["masks"]), plain["masks"][1:])
    assert torch.equal(out["area"], plain["area"][1:])


def test_per_instance_tensors():
    target = {"labels": torch.tensor([1]), "iscrowd": torch.tensor([0]), "boxes": torch.zeros(1, 4)}
    got = per_instance_tensors((torch.zeros(3, 2, 2), target))
    assert got == (target["labels"], target["iscrowd"])  # order: labels, area, iscrowd
    assert per_instance_tensors(target)[0] is target["labels"]
    assert per_instance_tensors((torch.zeros(1), {"boxes": torch.zeros(1, 4)})) is None
    assert per_instance_tensors((torch.zeros(1), "not a dict")) is None


def test_eval_transforms(dataset):
    image, target = dataset[2]
    out_image, out = eval_transforms()(image, target)
    assert type(out_image) is torch.Tensor
    assert out_image.dtype == torch.float32
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0
    assert torch.allclose(out_image, _plain(image).float() / 255)
    assert torch.equal(out["boxes"], _plain(target["boxes"]))
    assert torch.equal(out["boxes"], masks_to_boxes(out["masks"]))
    assert torch.equal(out["masks"], _plain(target["masks"]))
    assert out["labels"].dtype == torch.int64


def test_eval_transforms_on_pil(synthetic_root):
    path = sorted((synthetic_root / "PNGImages").glob("*.png"))[0]
    pil = Image.open(path).convert("RGB")
    out = eval_transforms()(pil)
    assert out.dtype == torch.float32
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    assert torch.allclose(out, expected)


# --- the tutorial-compatible T module ---------------------------------------------------------


class TutorialDataset:
    """The tutorial's own dataset shape: a PIL image and a dict of plain tensors."""

    def __init__(self, root, image_id_as_tensor: bool):
        self.imgs = sorted((root / "PNGImages").glob("*.png"))
        self.masks = sorted((root / "PedMasks").glob("*.png"))
        self.image_id_as_tensor = image_id_as_tensor

    def __getitem__(self, idx):
        image = Image.open(self.imgs[idx]).convert("RGB")
        mask = torch.from_numpy(np.array(Image.open(self.masks[idx])))
        ids = torch.unique(mask)[1:]
        masks = (mask == ids[:, None, None]).to(torch.uint8)
        boxes = masks_to_boxes(masks)
        target = {
            "boxes": boxes,
            "labels": torch.ones((len(ids),), dtype=torch.int64),
            "masks": masks,
            "image_id": torch.tensor([7]) if self.image_id_as_tensor else 7,
            "area": (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 2] - boxes[:, 0]),
            "iscrowd": torch.zeros((len(ids),), dtype=torch.int64),
        }
        return image, target


COMPOSES = {
    "ConvertImageDtype": lambda: T.Compose(
        [T.PILToTensor(), T.ConvertImageDtype(torch.float), T.RandomHorizontalFlip(1.0)]
    ),
    "ToDtype": lambda: T.Compose(
        [T.PILToTensor(), T.ToDtype(torch.float, scale=True), T.RandomHorizontalFlip(1.0)]
    ),
}


def _check_flipped(out_image, out, pixels, target):
    w = pixels.shape[-1]
    assert out_image.dtype == torch.float32
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0
    assert torch.allclose(_plain(out_image), torch.flip(pixels, [-1]).float() / 255)
    x0, y0, x1, y1 = target["boxes"].unbind(-1)
    assert torch.equal(_plain(out["boxes"]), torch.stack([w - x1, y0, w - x0, y1], -1))
    assert out["masks"].dtype == torch.uint8
    assert torch.equal(_plain(out["masks"]), torch.flip(target["masks"], [-1]))
    for key in ("labels", "area", "iscrowd"):
        assert torch.equal(_plain(out[key]), target[key]), key


@pytest.mark.parametrize("compose", sorted(COMPOSES))
@pytest.mark.parametrize("id_as_tensor", [False, True], ids=["int_id", "tensor_id"])
def test_t_compose_on_pil_dataset(synthetic_root, compose, id_as_tensor):
    ds = TutorialDataset(synthetic_root, image_id_as_tensor=id_as_tensor)
    image, target = ds[1]
    assert len(target["boxes"]) >= 2
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    out_image, out = COMPOSES[compose]()(image, target)
    _check_flipped(out_image, out, pixels, target)
    if id_as_tensor:
        assert type(out["image_id"]) is torch.Tensor
        assert out["image_id"].tolist() == [7]
    else:
        assert type(out["image_id"]) is int
        assert out["image_id"] == 7
    assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]))  # input not modified


def test_t_on_plain_tensor_image(synthetic_root):
    image, target = TutorialDataset(synthetic_root, image_id_as_tensor=True)[1]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    tf = T.Compose([T.ToDtype(torch.float, scale=True), T.RandomHorizontalFlip(1.0)])
    out_image, out = tf(pixels, target)
    _check_flipped(out_image, out, pixels, target)
    assert out["image_id"].tolist() == [7]


def test_t_without_target(synthetic_root):
    image, _ = TutorialDataset(synthetic_root, image_id_as_tensor=False)[0]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    out_image, out = T.Compose([T.PILToTensor(), T.RandomHorizontalFlip(1.0)])(image)
    assert out is None
    assert torch.equal(_plain(out_image), torch.flip(pixels, [-1]))


def test_t_keypoints_flip_keeps_visibility():
    h, w = 20, 30
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    keypoints = torch.tensor(
        [
            [[2.0, 3.0, 1.0], [10.5, 4.0, 0.0], [29.0, 19.0, 2.0]],
            [[0.0, 0.0, 1.0], [7, 8, 1], [5, 6, 0]],
        ]
    )
    target = {
        "boxes": torch.tensor([[1.0, 2.0, 29.0, 19.0], [0.0, 0.0, 8.0, 9.0]]),
        "labels": torch.tensor([1, 1]),
        "keypoints": keypoints,
    }
    _, out = T.RandomHorizontalFlip(1.0)(image, target)
    kp = out["keypoints"]
    assert type(kp) is torch.Tensor
    assert kp.shape == (2, 3, 3)
    assert torch.equal(kp[..., 2], keypoints[..., 2])  # visibility untouched
    assert torch.equal(kp[..., 1], keypoints[..., 1])
    # torchvision v2 flips key points as pixel indices: x -> (W - 1) - x
    assert torch.equal(kp[..., 0], (w - 1) - keypoints[..., 0])
    reference = F.horizontal_flip(tv_tensors.KeyPoints(keypoints[..., :2], canvas_size=(h, w)))
    assert torch.equal(kp[..., :2], _plain(reference))
    assert torch.equal(target["keypoints"], keypoints)  # the caller's target is not modified
