"""The model registry: situation A (COCO detectors with new class layers) from a local file and
from torchvision's cache, offline errors, situation B (the tutorial's MobileNetV2 code and the FPN
variant), training/prediction of every registered model, and rebuilding from a checkpoint."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import TINY
from detfit.checkpoint import model_info, rebuild_model
from detfit.data import PennFudanDataset, eval_transforms
from detfit.errors import DetfitError
from detfit.models import MODELS, build_model
from detfit.models.class_layers import CLASS_DEPENDENT_PREFIXES
from detfit.models.weights import cached_weights_path, load_state_dict_file, weights_filename

# Fewer proposals and detections than torchvision's defaults: the mask head dominates CPU time.
FAST = {
    **TINY,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
}

NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)

SITUATION_A = {
    "maskrcnn_resnet50_fpn": tvd.maskrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn": tvd.fasterrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": tvd.maskrcnn_resnet50_fpn_v2,
    "fasterrcnn_resnet50_fpn_v2": tvd.fasterrcnn_resnet50_fpn_v2,
}


def randomized_state(model: nn.Module, seed: int, drop_batch_counters: bool) -> dict:
    """The model's state dict with every constant-initialised tensor (norm weights, biases,
    running statistics) made random, so that a tensor left at its initial value is noticed."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            if drop_batch_counters:  # files trained with FrozenBatchNorm have none
                continue
        elif key.endswith("running_var"):
            value = torch.rand(value.shape, generator=gen) + 0.5
        elif (
            value.is_floating_point()
            and value.numel()
            and bool((value == value.flatten()[0]).all())
        ):
            value = torch.randn(value.shape, generator=gen) * 0.1 + 0.5
        state[key] = value.clone()
    return state


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """``coco_like(name)``: a self-made "COCO-pretrained" file for a situation A model (91 classes,
    random values), written once per module; returns (path, state dict)."""
    made: dict[str, tuple[Path, dict]] = {}
    folder = tmp_path_factory.mktemp("coco_like")

    def make(name: str) -> tuple[Path, dict]:
        if name not in made:
            torch.manual_seed(0)
            model = SITUATION_A[name](weights=None, weights_backbone=None, num_classes=91)
            state = randomized_state(model, 1, drop_batch_counters="v2" not in name)
            path = folder / f"my_coco_{name}.pth"
            torch.save(state, path)
            made[name] = (path, state)
        return made[name]

    return make


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    """A random ImageNet-style mobilenet_v2 state dict saved as a local file."""
    torch.manual_seed(0)
    state = randomized_state(torchvision.models.mobilenet_v2(weights=None), 2, False)
    path = tmp_path_factory.mktemp("mobilenet") / "my_mobilenet_v2.pth"
    torch.save(state, path)
    return path, state


def expected_class_shapes(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "roi_heads.box_predictor.cls_score.weight": (num_classes, 1024),
        "roi_heads.box_predictor.cls_score.bias": (num_classes,),
        "roi_heads.box_predictor.bbox_pred.weight": (4 * num_classes, 1024),
        "roi_heads.box_predictor.bbox_pred.bias": (4 * num_classes,),
    }
    if MODELS[name].has_masks:
        shapes["roi_heads.mask_predictor.mask_fcn_logits.weight"] = (num_classes, 256, 1, 1)
        shapes["roi_heads.mask_predictor.mask_fcn_logits.bias"] = (num_classes,)
    return shapes


def assert_loaded_except_class_layers(model: nn.Module, saved: dict, name: str) -> None:
    state = model.state_dict()
    assert set(state) == set(saved)
    class_keys = {k for k in state if k.startswith(CLASS_DEPENDENT_PREFIXES)}
    shapes = expected_class_shapes(name, 3)
    assert class_keys == set(shapes)
    for key, value in state.items():
        if key in class_keys:
            assert tuple(value.shape) == shapes[key], key
            assert saved[key].shape[0] in (91, 364), key  # the file's COCO layers
        else:
            assert torch.equal(value, saved[key]), key


def frozen_stem_params(model: nn.Module) -> set[str]:
    stem = ("backbone.body.conv1.", "backbone.body.bn1.", "backbone.body.layer1.")
    return {n for n, _ in model.named_parameters() if n.startswith(stem)}


def assert_torchvision_freezing(model: nn.Module, name: str) -> None:
    """trainable_backbone_layers=3: conv1 and layer1 frozen, layer2-4, FPN and heads trained."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == frozen_stem_params(model)
    assert "backbone.body.conv1.weight" in frozen
    assert any(n.startswith("backbone.body.layer1.") for n in frozen)
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    norms = [m for m in model.backbone.body.modules() if isinstance(m, NORMS)]
    assert len(norms) == 53
    if "v2" in name:  # torchvision's v2 recipe keeps ordinary BatchNorm in the backbone
        assert all(type(m) is nn.BatchNorm2d for m in norms)
    else:  # v1: FrozenBatchNorm with eps 0, as torchvision sets for the COCO_V1 weights
        assert all(type(m) is FrozenBatchNorm2d and m.eps == 0.0 for m in norms)


@pytest.mark.parametrize("name", list(SITUATION_A))
def test_situation_a_from_local_file(name, coco_like):
    path, saved = coco_like(name)
    model = build_model(name, 3, weights=str(path), **TINY)
    assert_loaded_except_class_layers(model, saved, name)
    assert_torchvision_freezing(model, name)
    assert model.transform.min_size == (64,) and model.transform.max_size == 96


def test_situation_a_through_the_weights_api_cache(coco_like, offline_torch_home, monkeypatch):
    path, saved = coco_like("maskrcnn_resnet50_fpn")
    enum = tvd.MaskRCNN_ResNet50_FPN_Weights.COCO_V1
    filename = weights_filename(enum)
    assert filename == "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    cached = offline_torch_home / filename
    assert cached_weights_path(enum) == cached
    try:
        os.link(path, cached)
    except OSError:
        shutil.copyfile(path, cached)

    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for spec in ("DEFAULT", "COCO_V1"):
        model = build_model("maskrcnn_resnet50_fpn", 3, weights=spec, **TINY)
        assert_loaded_except_class_layers(model, saved, "maskrcnn_resnet50_fpn")
        assert_torchvision_freezing(model, "maskrcnn_resnet50_fpn")
    assert calls == []


@pytest.mark.parametrize(
    ("name", "kwargs", "filename"),
    [
        ("maskrcnn_resnet50_fpn", {}, "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
        ("maskrcnn_mobilenet_v2_fpn", {}, "mobilenet_v2-b0353104.pth"),
        ("fasterrcnn_mobilenet_v2", {}, "mobilenet_v2-b0353104.pth"),
        (
            "fasterrcnn_resnet50_fpn",
            {"weights": None, "weights_backbone": "DEFAULT"},
            "resnet50-11ad3fa6.pth",
        ),
    ],
)
def test_offline_without_cache_names_file_and_folder(
    name, kwargs, filename, offline_torch_home, monkeypatch
):
    urls = []

    def offline(url, *args, **kwargs):
        urls.append(url)
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DetfitError) as info:
        build_model(name, 2, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert filename in message
    assert str(offline_torch_home) in message
    assert "no network here" in message
    assert len(urls) == 1 and urls[0].endswith("/" + filename) and urls[0] in message
    assert os.listdir(offline_torch_home) == []


def test_unknown_weights_names_list_the_choices():
    with pytest.raises(DetfitError) as info:
        build_model("maskrcnn_resnet50_fpn", 2, weights="COCO_V9")
    message = str(info.value)
    assert "COCO_V9" in message and "MaskRCNN_ResNet50_FPN_Weights" in message
    assert "DEFAULT" in message and "COCO_V1" in message

    with pytest.raises(DetfitError) as info:
        build_model("maskrcnn_mobilenet_v2_fpn", 2, weights_backbone="IMAGENET1K_V9")
    message = str(info.value)
    assert "IMAGENET1K_V9" in message
    assert "IMAGENET1K_V1" in message and "IMAGENET1K_V2" in message

    with pytest.raises(DetfitError, match="no full-detector weights"):
        build_model("fasterrcnn_mobilenet_v2", 2, weights="DEFAULT")
    with pytest.raises(DetfitError, match="unknown model 'resnet9000'.*maskrcnn_resnet50_fpn"):
        build_model("resnet9000", 2)
    with pytest.raises(DetfitError, match="background"):
        build_model("fasterrcnn_mobilenet_v2", 1, weights_backbone=None)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "coco.pth"
    with pytest.raises(DetfitError) as info:
        build_model("maskrcnn_resnet50_fpn", 2, weights=str(missing))
    assert str(missing) in str(info.value) and "not found" in str(info.value)
    with pytest.raises(DetfitError) as info:
        build_model("maskrcnn_mobilenet_v2_fpn", 2, weights_backbone=str(missing))
    assert str(missing) in str(info.value)


def test_hash_suffix_is_checked(tmp_path):
    bad = tmp_path / "x-deadbeef.pth"
    torch.save({"a": torch.zeros(2)}, bad)
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert not digest.startswith("deadbeef")
    with pytest.raises(DetfitError) as info:
        build_model("maskrcnn_resnet50_fpn", 2, weights=str(bad))
    message = str(info.value)
    assert "sha256" in message and str(bad) in message and "deadbeef" in message
    assert digest[:12] in message

    good = tmp_path / f"x-{digest[:8]}.pth"
    shutil.copyfile(bad, good)
    assert torch.equal(load_state_dict_file(good)["a"], torch.zeros(2))
    # the right hash, but not a Mask R-CNN: a one-line "does not fit" error
    with pytest.raises(DetfitError) as info:
        build_model("maskrcnn_resnet50_fpn", 2, weights=str(good), **TINY)
    assert "does not fit" in str(info.value) and "\n" not in str(info.value)


def seed_situation_b() -> FasterRCNN:
    """The tutorial's situation B code, verbatim but for weights=None."""
    backbone = torchvision.models.mobilenet_v2(weights=None).features
    backbone.out_channels = 1280
    anchor_generator = AnchorGenerator(
        sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)
    )
    roi_pooler = torchvision.ops.MultiScaleRoIAlign(
        featmap_names=["0"], output_size=7, sampling_ratio=2
    )
    return FasterRCNN(
        backbone, num_classes=2, rpn_anchor_generator=anchor_generator, box_roi_pool=roi_pooler
    )


def test_situation_b_matches_the_seed_code():
    torch.manual_seed(0)
    seed = seed_situation_b()
    ours = build_model("fasterrcnn_mobilenet_v2", 2, weights_backbone=None)
    seed_state, our_state = seed.state_dict(), ours.state_dict()
    assert list(seed_state) == list(our_state)
    assert {k: v.shape for k, v in seed_state.items()} == {k: v.shape for k, v in our_state.items()}
    assert ours.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    assert ours.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),)
    pool = ours.roi_heads.box_roi_pool
    assert isinstance(pool, MultiScaleRoIAlign)
    assert (pool.featmap_names, pool.output_size, pool.sampling_ratio) == (["0"], (7, 7), 2)
    assert ours.transform.min_size == seed.transform.min_size == (800,)
    assert [type(m) for m in ours.modules()] == [type(m) for m in seed.modules()]

    # same weights, same outputs (small images to keep it quick)
    ours.load_state_dict(seed_state)
    for model in (seed, ours):
        model.transform.min_size, model.transform.max_size = (64,), 96
        model.eval()
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = seed([image])[0], ours([image])[0]
    assert len(expected["boxes"]) > 0
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(expected[key], got[key]), key


def test_mobilenet_fpn_backbone_from_local_file(mobilenet_file):
    path, saved = mobilenet_file
    model = build_model("maskrcnn_mobilenet_v2_fpn", 2, weights_backbone=str(path), **TINY)
    body_state = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.body.")}
    mapped = {
        "backbone.body." + k.removeprefix("features."): v
        for k, v in saved.items()
        if k.startswith("features.") and not k.endswith("num_batches_tracked")
    }
    assert set(body_state) == set(mapped)
    for key, value in body_state.items():
        assert torch.equal(value, mapped[key]), key

    body = model.backbone.body
    norms = [m for m in body.modules() if isinstance(m, NORMS)]
    assert len(norms) == 52 and all(type(m) is FrozenBatchNorm2d for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    # the same stages frozen as torchvision's own mobilenet_backbone(trainable_layers=3)
    reference = mobilenet_backbone(
        backbone_name="mobilenet_v2", weights=None, fpn=True, trainable_layers=3
    )
    expected_frozen = {n for n, p in reference.body.named_parameters() if not p.requires_grad}
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == expected_frozen
    assert "0.0.weight" in frozen and "18.0.weight" not in frozen
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.roi_heads.parameters())

    # one anchor size tuple per feature map, 4x and 8x that map's real stride
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 128, 128))
    strides = [128 // f.shape[-1] for f in features.values()]
    assert strides == [8, 16, 32, 64]
    assert [128 // f.shape[-2] for f in features.values()] == strides
    anchors = model.rpn.anchor_generator
    assert anchors.sizes == tuple((4 * s, 8 * s) for s in strides)
    assert len(anchors.aspect_ratios) == len(features)
    assert anchors.num_anchors_per_location() == [6] * len(features)
    assert model.rpn.head.cls_logits.out_channels == 6
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2"]


# The R-CNN models this file has always covered; tests/test_models_families.py covers the rest.
RCNN_MODELS = [
    *SITUATION_A,
    "fasterrcnn_mobilenet_v2",
    "maskrcnn_mobilenet_v2_fpn",
    "fasterrcnn_mobilenet_v2_fpn",
]


@pytest.mark.parametrize("name", RCNN_MODELS)
def test_every_model_trains_one_step_and_predicts(name, synthetic_root):
    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, 2, weights=None, weights_backbone=None, **FAST)
    dataset = PennFudanDataset(synthetic_root, eval_transforms())
    images, targets = zip(dataset[0], dataset[1], strict=True)

    model.train()
    params = dict(model.named_parameters())
    watched = ["roi_heads.box_predictor.cls_score.weight", "rpn.head.cls_logits.weight"]
    if spec.has_masks:
        watched.append("roi_heads.mask_predictor.mask_fcn_logits.weight")
    before = {n: params[n].detach().clone() for n in watched}
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9
    )
    losses = model(list(images), list(targets))
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if spec.has_masks else set())
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.item() > 0
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for n in watched:
        assert not torch.equal(before[n], params[n]), n

    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    assert set(out) == {"boxes", "labels", "scores"} | ({"masks"} if spec.has_masks else set())
    n = len(out["scores"])
    assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
    if spec.has_masks:
        assert out["masks"].shape == (n, 1, *images[0].shape[-2:])


def eval_outputs(model: nn.Module, image: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        return model([image])[0]


@pytest.mark.parametrize("name", ["maskrcnn_mobilenet_v2_fpn", "maskrcnn_resnet50_fpn"])
def test_rebuild_from_checkpoint_without_weights_file(name, coco_like, mobilenet_file, tmp_path):
    source = coco_like(name)[0] if name in SITUATION_A else mobilenet_file[0]
    path = tmp_path / "pretrained.pth"  # a copy that is deleted before rebuilding
    shutil.copyfile(source, path)
    options = dict(FAST, box_score_thresh=0.0)
    if name in SITUATION_A:
        model = build_model(name, 2, weights=str(path), **options)
    else:
        model = build_model(name, 2, weights_backbone=str(path), **options)
    info = model_info(name, 2, ["__background__", "person"], options, model)
    state = model.state_dict()
    path.unlink()

    rebuilt = rebuild_model(info, state)
    frozen_bn = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert len(frozen_bn) > 40
    assert {n for n, m in rebuilt.named_modules() if isinstance(m, FrozenBatchNorm2d)} == frozen_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rebuilt.modules())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and {n for n, p in rebuilt.named_parameters() if not p.requires_grad} == frozen
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert {n: m.eps for n, m in rebuilt.named_modules() if n in eps} == eps

    image = torch.rand(3, 80, 96, generator=torch.Generator().manual_seed(5))
    expected, got = eval_outputs(model, image), eval_outputs(rebuilt, image)
    assert len(expected["scores"]) > 0
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_situation_a_imagenet_backbone_from_local_file(tmp_path):
    """weights=None with a local ImageNet ResNet-50 file: the backbone holds exactly its tensors."""
    resnet = torchvision.models.resnet50(weights=None)
    for module in resnet.modules():  # non-default BN statistics, so a skipped load would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    path = tmp_path / "my_resnet50.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(
        "fasterrcnn_resnet50_fpn", 3, weights=None, weights_backbone=str(path), **TINY
    )
    body = model.backbone.body.state_dict()
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    assert set(body) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(body[key], tensor), key
    assert not model.backbone.body.conv1.weight.requires_grad  # torchvision's 3 trainable layers
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_mask_levels_pools_masks_from_the_finest_levels_only(synthetic_root):
    """mask_levels=1: the mask pooler reads stride 8 alone (every RoI, whatever its size); the box
    pooler still reads every level. The model trains and the option survives a rebuild."""
    options = {**FAST, "num_levels": 3, "fpn_channels": 32, "mask_head_channels": 32}
    model = build_model(
        "maskrcnn_mobilenet_v2_fpn",
        2,
        weights=None,
        weights_backbone=None,
        mask_levels=1,
        **options,
    )
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0"]
    assert model.roi_heads.mask_roi_pool.scales == [1 / 8]
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]
    image, target = PennFudanDataset(synthetic_root, eval_transforms())[0]
    model.train()
    losses = model([image], [target])
    assert torch.isfinite(losses["loss_mask"])
    info = model_info("maskrcnn_mobilenet_v2_fpn", 2, None, {**options, "mask_levels": 1}, model)
    rebuilt = rebuild_model(info, model.state_dict())
    assert rebuilt.roi_heads.mask_roi_pool.featmap_names == ["0"]
    with pytest.raises(DetfitError, match=r"mask_levels must be in \[1, 3\], got 4"):
        build_model("maskrcnn_mobilenet_v2_fpn", 2, weights_backbone=None, mask_levels=4, **options)
    with pytest.raises(DetfitError, match="are Mask R-CNN options"):
        build_model("fasterrcnn_mobilenet_v2_fpn", 2, weights_backbone=None, mask_levels=1)


def test_each_spec_states_the_options_it_takes():
    from detfit.config import known_model_options
    from detfit.models import options_not_taken

    probes = ("fpn_channels", "mask_head_norm", "size", "anchor_sizes", "num_keypoints")
    probes += ("keep_classes", "min_size")

    def takes(name: str) -> set[str]:
        return {k for k in probes if MODELS[name].takes(k)}

    assert takes("maskrcnn_mobilenet_v2_fpn") == {
        "fpn_channels", "mask_head_norm", "anchor_sizes", "min_size"
    }  # fmt: skip
    assert takes("fasterrcnn_mobilenet_v2") == {"anchor_sizes", "min_size"}  # no FPN, no masks
    assert takes("maskrcnn_resnet50_fpn") == {"anchor_sizes", "keep_classes", "min_size"}
    assert takes("keypointrcnn_resnet50_fpn") == {
        "anchor_sizes", "keep_classes", "min_size", "num_keypoints"
    }  # fmt: skip
    assert takes("ssdlite320_mobilenet_v3_large") == {"size", "keep_classes"}
    assert takes("ssd300_vgg16") == {"keep_classes"}  # VGG fixes 300 px; default boxes fixed
    # R-CNNs take the plain and the box_ name of a detection setting
    assert MODELS["fasterrcnn_resnet50_fpn"].takes("detections_per_img")
    assert MODELS["fasterrcnn_resnet50_fpn"].takes("box_detections_per_img")
    assert not MODELS["retinanet_resnet50_fpn"].takes("box_detections_per_img")
    cpu = {"fpn_channels": 128, "mask_head_channels": 256, "box_batch_size_per_image": 64}
    assert options_not_taken("retinanet_resnet18_fpn", cpu) == [
        "mask_head_channels", "box_batch_size_per_image"
    ]  # fmt: skip
    # the names the settings accept are exactly those some model takes
    assert known_model_options() == frozenset().union(*(s.options for s in MODELS.values()))


def test_an_unknown_weights_name_lists_the_enum_and_says_what_default_means():
    from torchvision.models import MobileNet_V2_Weights

    from detfit.errors import DetfitError
    from detfit.models.weights import resolve_weights

    assert (
        resolve_weights("IMAGENET1K_V1", MobileNet_V2_Weights) is MobileNet_V2_Weights.IMAGENET1K_V1
    )
    with pytest.raises(DetfitError) as info:
        resolve_weights("IMAGENET9", MobileNet_V2_Weights)
    assert str(info.value) == (
        "weights 'IMAGENET9': not one of MobileNet_V2_Weights (DEFAULT, IMAGENET1K_V1, "
        "IMAGENET1K_V2), nor default (lowercase: the registry's pick for this model)"
    )
