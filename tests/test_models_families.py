"""Every torchvision detection family (situation A) and every head x backbone (situation B): class
layers replaced with every other pretrained tensor kept, kept class rows, training and prediction
for K in {2, 5}, plain model options saved in checkpoints, and the seed's situation B code."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import FAST_EVAL, TINY
from detfit.checkpoint import model_info, rebuild_model
from detfit.data import PennFudanDataset, eval_transforms
from detfit.errors import DetfitError
from detfit.models import MODELS, build_model
from detfit.models.class_layers import class_dependent_modules
from detfit.models.registry import TORCHVISION
from detfit.models.weights import weights_filename
from test_models import FAST, randomized_state

COCO = tvd.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
PERSON, DOG = COCO.index("person"), COCO.index("dog")
KEYPOINT_NAMES = tvd.KeypointRCNN_ResNet50_FPN_Weights.DEFAULT.meta["keypoint_names"]
# Families test_models.py does not already build from a file.
NEW_FAMILIES = [
    n for n in TORCHVISION if "resnet50_fpn" not in n or not n.startswith(("mask", "faster"))
]
SSD = ("ssd300_vgg16", "ssdlite320_mobilenet_v3_large")


def torchvision_coco(name: str) -> nn.Module:
    """torchvision's own model as its COCO file holds it (91 classes; people for keypoints)."""
    extra = {"num_classes": 2, "num_keypoints": 17} if "keypoint" in name else {"num_classes": 91}
    return getattr(tvd, name)(weights=None, weights_backbone=None, **extra)


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    """``coco_file(name)``: a self-made "COCO-pretrained" file (random values) and its tensors."""
    made: dict = {}
    folder = tmp_path_factory.mktemp("coco_families")

    def make(name: str):
        if name not in made:
            torch.manual_seed(0)
            # FrozenBatchNorm files carry no batch counters; v2 and SSD BatchNorm ones do
            state = randomized_state(
                torchvision_coco(name), 1, name not in SSD and "v2" not in name
            )
            path = folder / f"my_{name}.pth"
            torch.save(state, path)
            made[name] = (path, state)
        return made[name]

    return make


def keep_options(name: str) -> tuple[dict, list[int], list[int] | None]:
    """keep_* options for 4 classes (3 for people-only weights) and the rows they keep."""
    if "keypoint" in name:
        options = {"keep_classes": ["person"], "keep_keypoints": ["nose", "left_wrist"]}
        return {**options, "num_keypoints": 3}, [0, PERSON], [0, KEYPOINT_NAMES.index("left_wrist")]
    return {"keep_classes": ["dog", "person"]}, [0, DOG, PERSON], None


def rows(weight: torch.Tensor, count: int, dim: int = 0) -> torch.Tensor:
    """[groups, count, rest] view of a layer's outputs laid out group-major along ``dim``."""
    weight = weight.transpose(0, dim) if dim else weight
    return weight.reshape(-1, count, *weight.shape[1:])


def assert_kept_rows(name: str, model: nn.Module, saved: dict, keep: list[int], num: int) -> None:
    old = 2 if "keypoint" in name else 91
    state = model.state_dict()
    for module in class_dependent_modules(model):
        if module.endswith("keypoint_predictor"):
            continue
        for kind in ("weight", "bias"):
            key = f"{module}.{kind}"
            if module.endswith("box_predictor"):
                for sub, inner in (("cls_score", 1), ("bbox_pred", 4)):
                    key = f"{module}.{sub}.{kind}"
                    new_rows, old_rows = (
                        rows(state[key], num * inner),
                        rows(saved[key], old * inner),
                    )
                    for j, c in enumerate(keep):
                        got = new_rows[:, j * inner : (j + 1) * inner]
                        assert torch.equal(got, old_rows[:, c * inner : (c + 1) * inner]), key
                break
            new_rows, old_rows = rows(state[key], num), rows(saved[key], old)
            assert new_rows.shape[0] == old_rows.shape[0]  # anchors per location kept
            for j, c in enumerate(keep):
                assert torch.equal(new_rows[:, j], old_rows[:, c]), (key, j)
            fresh = new_rows[:, len(keep) :]
            assert not any(torch.equal(fresh[:, 0], old_rows[:, c]) for c in range(old))


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_situation_a_keeps_every_pretrained_tensor(name, coco_file):
    path, saved = coco_file(name)
    options, keep, keep_kp = keep_options(name)
    size = {} if name in SSD else TINY
    model = build_model(name, 4, weights=str(path), **size, **options)
    state = model.state_dict()
    renewed = tuple(m + "." for m in class_dependent_modules(model))
    assert set(state) == set(saved)
    assert any(k.startswith(renewed) for k in state)
    for key, value in state.items():
        if not key.startswith(renewed):
            assert torch.equal(value, saved[key]), key
        else:
            assert value.shape != saved[key].shape, key
    assert_kept_rows(name, model, saved, keep, 4)
    if keep_kp:
        key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
        assert state[key].shape[1] == 3
        for j, c in enumerate(keep_kp):
            assert torch.equal(state[key][:, j], saved[key][:, c])
    # torchvision's own freezing: the stem of the pretrained backbone is not trained
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if name != "ssdlite320_mobilenet_v3_large":  # torchvision trains all 6 of its stages
        assert frozen
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(renewed))


def test_keep_classes_errors(coco_file):
    path, _ = coco_file("retinanet_resnet50_fpn")
    cases = [
        ({"keep_classes": ["unicorn"]}, "'unicorn' is not one of the weights' classes"),
        ({"keep_classes": ["person", "dog", "cat"]}, "3 names do not fit 3 outputs"),
        ({"keep_classes": ["person", "person"]}, "names repeat"),
        ({"keep_classes": ["N/A"]}, "'N/A' is not one of"),
        ({"num_keypoints": 3}, "Keypoint R-CNN options"),
    ]
    for options, message in cases:
        with pytest.raises(DetfitError, match=message) as info:
            build_model("retinanet_resnet50_fpn", 3, weights=str(path), **TINY, **options)
        assert "\n" not in str(info.value)
    with pytest.raises(DetfitError, match="need pretrained weights"):
        build_model("retinanet_resnet50_fpn", 3, weights=None, keep_classes=["person"])


def test_cached_weights_build_without_network(coco_file, offline_torch_home, monkeypatch):
    path, saved = coco_file("retinanet_resnet50_fpn")
    enum = tvd.RetinaNet_ResNet50_FPN_Weights.COCO_V1
    os.link(path, offline_torch_home / weights_filename(enum))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    for module, attr in [
        (torch.hub, "load_state_dict_from_url"),
        (torch.hub, "download_url_to_file"),
        (urllib.request, "urlopen"),
    ]:
        monkeypatch.setattr(module, attr, no_network)
    for spec in ("DEFAULT", "COCO_V1", "RetinaNet_ResNet50_FPN_Weights.COCO_V1"):
        model = build_model("retinanet_resnet50_fpn", 3, weights=spec, keep_classes=["person"])
        head = model.state_dict()["head.classification_head.cls_logits.bias"]
        old = saved["head.classification_head.cls_logits.bias"].view(-1, 91)
        assert torch.equal(head.view(-1, 3)[:, :2], old[:, [0, PERSON]])
        # torchvision's eps override for these weights
        assert all(m.eps == 0.0 for m in model.modules() if isinstance(m, FrozenBatchNorm2d))


@pytest.mark.parametrize(
    ("name", "kwargs", "filename"),
    [
        ("ssdlite320_mobilenet_v3_large", {}, "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"),
        ("keypointrcnn_resnet50_fpn", {}, "keypointrcnn_resnet50_fpn_coco-fc266e95.pth"),
        ("fcos_resnet18_fpn", {}, "resnet18-f37072fd.pth"),
        ("ssd300_vgg16", {"weights": None, "weights_backbone": "DEFAULT"}, "vgg16-397923af.pth"),
    ],
)
def test_offline_without_cache_is_one_line(name, kwargs, filename, offline_torch_home, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DetfitError) as info:
        build_model(name, 2, **kwargs)
    message = str(info.value)
    assert "\n" not in message and filename in message and str(offline_torch_home) in message


def synthetic_batch(root, num_classes: int, keypoints: int = 0):
    """Two synthetic images whose people get labels 1..K-1 (and keypoints inside their boxes)."""
    dataset = PennFudanDataset(root, eval_transforms())
    images, targets = [], []
    gen = torch.Generator().manual_seed(num_classes)
    for i in range(2):
        image, target = dataset[i]
        n = len(target["boxes"])
        target = dict(target, labels=torch.randint(1, num_classes, (n,), generator=gen))
        if keypoints:
            boxes = target["boxes"]
            t = torch.rand(n, keypoints, 2, generator=gen)
            xy = boxes[:, None, :2] + t * (boxes[:, None, 2:] - boxes[:, None, :2])
            target["keypoints"] = torch.cat([xy, torch.ones(n, keypoints, 1)], dim=2)
        images.append(image)
        targets.append(target)
    return images, targets


def fast_options(name: str) -> dict:
    """Tiny inputs and few candidates, under each family's own option names."""
    if name in SSD:
        size = {"size": 96} if name.startswith("ssdlite") else {}
        return {**size, "detections_per_img": 10, "topk_candidates": 50}
    if name.startswith(("retinanet", "fcos")):
        return {**TINY, "detections_per_img": 10, "topk_candidates": 50}
    return {**FAST, "num_keypoints": 4} if "keypoint" in name else dict(FAST)


LOSSES = {
    "rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "ssd": {"classification", "bbox_regression"},
}
# every torchvision family, and situation B's heads (one map and FPN) on a small backbone
ARCHITECTURES = [
    *TORCHVISION,
    *[
        f"{h}_mobilenet_v3_small{f}"
        for h in ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
        for f in ("", "_fpn")
    ],
]


def family(name: str) -> str:
    return next((f for f in ("retinanet", "fcos", "ssd") if name.startswith(f)), "rcnn")


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_trains_and_predicts(name, num_classes, synthetic_root):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(
        name, num_classes, weights=None, weights_backbone=None, **fast_options(name)
    )
    keypoints = 4 if spec.has_keypoints else 0
    images, targets = synthetic_batch(synthetic_root, num_classes, keypoints)
    renewed = class_dependent_modules(model)
    watched = {n: p for n, p in model.named_parameters() if n.startswith(tuple(renewed))}
    before = {n: p.detach().clone() for n, p in watched.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):
        losses = model(images, targets)
        expected = LOSSES[family(name)] | ({"loss_mask"} if spec.has_masks else set())
        assert set(losses) == expected | ({"loss_keypoint"} if keypoints else set())
        loss = sum(losses.values())
        assert torch.isfinite(loss) and loss.item() > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in watched.items())

    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    extra = (
        {"masks"} if spec.has_masks else {"keypoints", "keypoints_scores"} if keypoints else set()
    )
    assert set(out) == {"boxes", "labels", "scores"} | extra
    n = len(out["scores"])
    assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
    assert bool((out["labels"] < num_classes).all())
    if keypoints:
        assert out["keypoints"].shape == (n, keypoints, 3)


SITUATION_B = [n for n, s in MODELS.items() if s.situation == "B"]


@pytest.mark.parametrize("name", SITUATION_B)
def test_every_backbone_and_head_runs(name):
    torch.manual_seed(0)
    model = build_model(
        name, 3, weights_backbone=None, **TINY, **FAST_EVAL_OPTIONS[family(name)]
    ).eval()
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 128, 128))
        out = model([image])[0]
    assert {"boxes", "labels", "scores"} <= set(out)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    strides = [128 // f.shape[-1] for f in features.values()]
    generator = model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator
    assert len(generator.sizes) == len(features)
    if name.startswith("fcos"):
        assert generator.sizes == tuple((s,) for s in strides)
    elif name.endswith("_fpn"):
        assert strides[:3] == [8, 16, 32]
        assert generator.sizes[0][0] == 4 * strides[0]
    else:
        assert strides == [32] and generator.sizes == ((32, 64, 128, 256, 512),)
    if hasattr(model, "roi_heads"):
        names = [n for n in features if n != "pool"]
        assert model.roi_heads.box_roi_pool.featmap_names == names
        assert model.roi_heads.box_roi_pool.scales == [1 / s for s in strides[: len(names)]]


FAST_EVAL_OPTIONS = {
    "rcnn": FAST_EVAL,
    "retinanet": {"detections_per_img": 5, "topk_candidates": 20},
    "fcos": {"detections_per_img": 5, "topk_candidates": 20},
}


def seed_way(head: str, backbone_name: str) -> nn.Module:
    """The seed's situation B code (its tutorial's, torchvision's RetinaNet docstring's) on any
    ``.features`` backbone, weights=None."""
    backbone = getattr(torchvision.models, backbone_name)(weights=None).features
    backbone.out_channels = backbone[-1].out_channels
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    if head == "retinanet":
        return RetinaNet(backbone, num_classes=2, anchor_generator=anchors)
    roi_pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    if head == "maskrcnn":
        mask_pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=2)
        return MaskRCNN(
            backbone,
            2,
            rpn_anchor_generator=anchors,
            box_roi_pool=roi_pooler,
            mask_roi_pool=mask_pooler,
        )
    return FasterRCNN(
        backbone, num_classes=2, rpn_anchor_generator=anchors, box_roi_pool=roi_pooler
    )


@pytest.mark.parametrize("head", ["fasterrcnn", "maskrcnn", "retinanet"])
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"])
def test_seed_situation_b_code_gives_the_same_model(head, backbone):
    seed = seed_way(head, backbone)
    ours = build_model(f"{head}_{backbone}", 2, weights_backbone=None)
    seed_state, our_state = seed.state_dict(), ours.state_dict()
    assert {k: v.shape for k, v in seed_state.items()} == {k: v.shape for k, v in our_state.items()}
    assert list(seed_state) == list(our_state)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        (
            "fasterrcnn_resnet18_fpn",
            lambda: resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3),
        ),
        (
            "retinanet_resnext50_32x4d_fpn",
            lambda: resnet_fpn_backbone(
                backbone_name="resnext50_32x4d", weights=None, trainable_layers=3
            ),
        ),
        (
            "maskrcnn_mobilenet_v3_large_fpn",
            lambda: mobilenet_backbone(
                backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=3
            ),
        ),
    ],
)
def test_situation_b_fpn_backbone_from_local_file(name, reference, tmp_path):
    """An ImageNet file: the trunk holds exactly its tensors, with torchvision's FrozenBatchNorm and
    frozen stages."""
    backbone = MODELS[name].backbone
    torch.manual_seed(0)
    classifier = getattr(torchvision.models, backbone)(weights=None)
    saved = randomized_state(classifier, 3, False)
    path = tmp_path / f"my_{backbone}.pth"
    torch.save(saved, path)
    model = build_model(name, 2, weights_backbone=str(path), **TINY)
    body = model.backbone.body
    prefix = "" if hasattr(classifier, "layer4") else "features."
    for key, value in body.state_dict().items():
        assert torch.equal(value, saved[prefix + key]), key
    assert not any(type(m) is nn.BatchNorm2d for m in body.modules())
    eps = {m.eps for m in body.modules() if isinstance(m, FrozenBatchNorm2d)}
    assert eps == {m.eps for m in classifier.modules() if isinstance(m, nn.BatchNorm2d)}
    ours = dict(body.named_parameters())
    theirs = dict(reference().body.named_parameters())
    assert set(theirs) <= set(ours)  # torchvision's extractor may stop earlier
    assert {n: p.requires_grad for n, p in ours.items() if n in theirs} == {
        n: p.requires_grad for n, p in theirs.items()
    }
    assert all(p.requires_grad for n, p in ours.items() if n not in theirs)
    assert any(not p.requires_grad for p in ours.values())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())


def test_efficientnet_stages_and_errors():
    model = build_model(
        "fcos_efficientnet_b0_fpn", 2, weights_backbone=None, trainable_backbone_layers=2
    )
    frozen_blocks = {
        n.split(".")[0] for n, p in model.backbone.body.named_parameters() if not p.requires_grad
    }
    # stages start at blocks 0, 2, 3, 4, 6 (stride changes) and 8 (the last): 2 trainable -> 0-5 frozen
    assert frozen_blocks == {"0", "1", "2", "3", "4", "5"}
    with pytest.raises(DetfitError, match=r"trainable_backbone_layers must be in \[0, 6\]"):
        build_model(
            "fcos_efficientnet_b0_fpn", 2, weights_backbone=None, trainable_backbone_layers=7
        )
    with pytest.raises(DetfitError, match="need an FPN"):
        build_model("fcos_resnet18", 2, weights_backbone=None, num_levels=2)
    with pytest.raises(DetfitError, match="Mask R-CNN options"):
        build_model("fcos_resnet18", 2, weights_backbone=None, mask_head_channels=64)
    with pytest.raises(DetfitError, match="no full-detector weights"):
        build_model("fcos_resnet18", 2, weights="DEFAULT")


def outputs(model: nn.Module, image: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        return model([image])[0]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        (
            "retinanet_resnet50_fpn",
            {
                "min_size": 72,
                "max_size": 100,
                "trainable_backbone_layers": 2,
                "anchor_sizes": [
                    [24, 30, 38],
                    [48, 60, 76],
                    [96, 120, 150],
                    [192, 240, 300],
                    [384, 480, 600],
                ],
                "aspect_ratios": [0.4, 1.0, 2.5],
                "detections_per_img": 7,
                "score_thresh": 0.0,
                "nms_thresh": 0.3,
                "keep_classes": ["person"],
            },
        ),
        (
            "fasterrcnn_resnet18_fpn",
            {
                **FAST,
                "trainable_backbone_layers": 1,
                "anchor_sizes": [[20, 40], [40, 80], [80, 160], [160, 320]],
                "detections_per_img": 6,
                "score_thresh": 0.0,
                "nms_thresh": 0.4,
                "num_levels": 3,
                "fpn_channels": 64,
            },
        ),
        (
            "ssdlite320_mobilenet_v3_large",
            {
                "size": 128,
                "trainable_backbone_layers": 3,
                "detections_per_img": 9,
                "score_thresh": 0.0,
            },
        ),
    ],
)
def test_options_are_applied_and_rebuilt_from_the_checkpoint(name, options, coco_file, tmp_path):
    if name in TORCHVISION:
        model = build_model(name, 2, weights=str(coco_file(name)[0]), **options)
    else:
        resnet = torchvision.models.resnet18(weights=None)
        torch.save(randomized_state(resnet, 4, False), tmp_path / "r18.pth")
        model = build_model(name, 2, weights_backbone=str(tmp_path / "r18.pth"), **options)
    # the plain names reach each family's own settings
    if hasattr(model, "roi_heads"):
        heads = model.roi_heads
        got = (heads.detections_per_img, heads.score_thresh, heads.nms_thresh)
    else:
        got = (model.detections_per_img, model.score_thresh, model.nms_thresh)
    expected = (options["detections_per_img"], options["score_thresh"], options.get("nms_thresh"))
    assert got[:2] == expected[:2] and (expected[2] is None or got[2] == expected[2])
    if "anchor_sizes" in options:
        generator = model.rpn.anchor_generator if hasattr(model, "rpn") else model.anchor_generator
        assert generator.sizes == tuple(tuple(s) for s in options["anchor_sizes"])
    if "aspect_ratios" in options:
        assert model.anchor_generator.aspect_ratios == (tuple(options["aspect_ratios"]),) * 5
    if "size" in options:
        assert model.transform.fixed_size == (128, 128)
    else:
        assert model.transform.min_size == (options["min_size"],)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen

    info = model_info(name, 2, ["__background__", "person"], options, model)
    state = model.state_dict()
    rebuilt = rebuild_model(info, state)
    assert {n for n, p in rebuilt.named_parameters() if not p.requires_grad} == frozen
    image = torch.rand(3, 90, 110, generator=torch.Generator().manual_seed(5))
    expected, got = outputs(model, image), outputs(rebuilt, image)
    assert len(expected["scores"]) > 0
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        (
            "retinanet_resnet18_fpn",
            {"anchor_sizes": [[32], [64], [128], [256], [512]]},
            "anchors per location",
        ),
        ("fcos_resnet18_fpn", {"anchor_sizes": [[8], [16]]}, "need 5 lists"),
        ("fasterrcnn_resnet18", {"anchor_sizes": [32, 64]}, "one list per feature map"),
        ("ssd300_vgg16", {"size": 200}, "fix the input at 300"),
        ("ssd300_vgg16", {"min_size": 200}, "set size, not min_size"),
        ("ssdlite320_mobilenet_v3_large", {"anchor_sizes": [[1]]}, "default boxes are fixed"),
        ("fcos_resnet18", {"size": 200}, "size is an SSD option"),
        (
            "retinanet_resnet18",
            {"colour": "red"},
            "unknown model option.s. for it; it takes .*min_size",
        ),
    ],
)
def test_option_errors_are_one_line(name, options, message):
    with pytest.raises(DetfitError, match=message) as info:
        build_model(name, 2, weights=None, weights_backbone=None, **options)
    assert "\n" not in str(info.value)


def test_models_command_lists_metadata_and_offline(offline_torch_home):
    from typer.testing import CliRunner

    from detfit.cli import app

    (offline_torch_home / "resnet18-f37072fd.pth").write_bytes(b"")  # only its presence counts
    (offline_torch_home / weights_filename(tvd.FCOS_ResNet50_FPN_Weights.COCO_V1)).write_bytes(b"")
    result = CliRunner().invoke(app, ["models"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    for name in MODELS:
        assert name in rows, name
    for name in TORCHVISION:
        meta = MODELS[name].weights_enum.DEFAULT.meta
        metrics = meta["_metrics"]["COCO-val2017"]
        row = rows[name]
        aps = [
            f"{metrics[k]:.1f}" if k in metrics else "-" for k in ("box_map", "mask_map", "kp_map")
        ]
        assert row[2:5] == aps, name
        assert row[5:8] == [
            f"{meta['num_params'] / 1e6:.1f}",
            f"{meta['_ops']:.2f}",
            f"{meta['_file_size']:.1f}",
        ]
        assert row[8] == ("yes" if name == "fcos_resnet50_fpn" else "no"), name
    assert rows["resnet18"][1] == "69.8" and rows["resnet18"][-1] == "yes"
    assert rows["resnet34"][-1] == "no"
    assert rows["fcos_resnet18_fpn"][-1] == "yes" and rows["fcos_resnet34_fpn"][-1] == "no"
