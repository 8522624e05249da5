"""The speed-ups against the plain path: FrozenBatchNorm folding, channels_last, the
sparse RoIAlign (also tests/test_roi_align.py) and the fused optimizer step each keep the
outputs, within the stated floating-point tolerances."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import test_models
from conftest import SMALL, run_config
from detfit.checkpoint import rebuild_model
from detfit.config import SPEED_UPS_OFF, TrainConfig
from detfit.engine.builders import build_optimizer
from detfit.models import build_model
from detfit.models.roi_align import SparseMultiScaleRoIAlign
from detfit.models.speedups import (
    FoldedAway,
    FoldedConv2d,
    fold_frozen_batchnorm,
    resolve_memory_format,
    speed_up,
)
from test_models import randomized_state

mobilenet_file = test_models.mobilenet_file  # the fixture: a random "ImageNet" file, saved by it

# Folding changes the order of float32 operations (scale the weight, then convolve, instead of
# convolve, then scale the output), so results agree to rounding, relative to each tensor's size.
RTOL = 1e-4


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().clamp_min(1e-12))


def frozen(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with random, non-trivial FrozenBatchNorm statistics (as a pretrained one has)."""
    model.load_state_dict(randomized_state(model, seed, drop_batch_counters=False))
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[list, dict]:
    out = model(x)
    maps = list(out.values()) if isinstance(out, dict) else [out]
    weights = torch.Generator().manual_seed(1)
    loss = sum((m * torch.randn(m.shape, generator=weights)).sum() for m in maps)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [m.detach() for m in maps], grads


def assert_same(plain: nn.Module, fast: nn.Module, x: torch.Tensor) -> None:
    maps, grads = outputs_and_grads(plain, x)
    fast_maps, fast_grads = outputs_and_grads(fast, x.clone())
    assert len(maps) == len(fast_maps)
    for a, b in zip(fast_maps, maps, strict=True):
        assert a.shape == b.shape and relative_error(a, b) < RTOL
    assert grads and set(fast_grads) == set(grads)
    for name, g in grads.items():
        assert relative_error(fast_grads[name], g) < RTOL, name


def test_mobilenet_v2_every_frozen_norm_folds_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = frozen(torchvision.models.mobilenet_v2(norm_layer=FrozenBatchNorm2d).features)
    for block in list(plain.children())[:4]:  # frozen stages, as a pretrained FPN backbone has
        block.requires_grad_(False)
    fast = copy.deepcopy(plain)
    norms = sum(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    assert fold_frozen_batchnorm(fast) == norms == 52
    assert sum(type(m) is FoldedConv2d for m in fast.modules()) == 52
    assert all(type(m) is FoldedAway for m in fast.modules() if isinstance(m, FrozenBatchNorm2d))
    # the state dict is untouched: same keys, same tensors, loadable both ways
    assert list(fast.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key
    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(2))
    assert_same(plain, fast, x)


def test_resnet_blocks_and_layer_getter_fold_but_a_returned_conv_output_does_not():
    torch.manual_seed(0)
    resnet = frozen(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d))
    plain = IntermediateLayerGetter(resnet, {"layer2": "0", "layer4": "1"})
    fast = copy.deepcopy(plain)
    # conv1/bn1, 8 blocks x 2, 2 downsamples... resnet18 has 3: every norm follows a conv
    assert fold_frozen_batchnorm(fast) == sum(
        isinstance(m, FrozenBatchNorm2d) for m in plain.modules()
    )
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    assert_same(plain, fast, x)

    # when the convolution's own output is a returned feature, its norm must stay a norm
    plain = IntermediateLayerGetter(
        frozen(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)),
        {"conv1": "c", "layer1": "x"},
    )
    fast = copy.deepcopy(plain)
    assert fold_frozen_batchnorm(fast) == 4  # layer1's two blocks; conv1/bn1 stays apart
    assert type(fast.conv1) is nn.Conv2d and type(fast.bn1) is FrozenBatchNorm2d
    with torch.no_grad():
        got, expected = fast(x), plain(x)
    assert torch.equal(got["c"], expected["c"]) and relative_error(got["x"], expected["x"]) < RTOL


def test_trainable_batchnorm_is_not_folded_and_a_copy_keeps_its_own_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    assert fold_frozen_batchnorm(model) == 0
    model = frozen(nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), FrozenBatchNorm2d(4)))
    fold_frozen_batchnorm(model)
    twin = copy.deepcopy(model)
    assert twin[0].norm_ref[0] is twin[1] and twin[1] is not model[1]
    with torch.no_grad():  # statistics changed later are used: the fold happens at every call
        twin[1].running_mean.add_(1.0)
        reference = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), FrozenBatchNorm2d(4))
        reference.load_state_dict(twin.state_dict())
        x = torch.rand(1, 3, 8, 8)
        assert relative_error(twin(x), reference(x)) < RTOL
        assert relative_error(model(x), reference(x)) > 0.01


def detector_losses(model: nn.Module, images, targets) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)  # the same RoI sampling on both paths
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def test_recipe_detector_sped_up_same_losses_and_gradients(mobilenet_file):
    torch.manual_seed(0)
    plain = build_model(
        "maskrcnn_mobilenet_v2_fpn", 2, weights_backbone=str(mobilenet_file[0]), **SMALL
    )
    fast = speed_up(
        copy.deepcopy(plain),
        torch.device("cpu"),
        fold_frozen_bn=True,
        memory_format="channels_last",
        sparse_roi_align=True,
    )
    assert sum(type(m) is FoldedConv2d for m in fast.modules()) == 52
    assert type(fast.roi_heads.box_roi_pool) is SparseMultiScaleRoIAlign
    assert type(fast.roi_heads.mask_roi_pool) is SparseMultiScaleRoIAlign
    convs = [m for m in fast.backbone.modules() if isinstance(m, nn.Conv2d)]
    convs += [m for m in fast.rpn.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    heads = [m for m in fast.roi_heads.modules() if isinstance(m, nn.Conv2d)]
    assert heads and all(c.weight.is_contiguous() for c in heads)
    gen = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 80, 72, generator=gen), torch.rand(3, 64, 96, generator=gen)]
    targets = []
    for image in images:
        masks = torch.zeros(2, *image.shape[1:], dtype=torch.uint8)
        masks[0, 10:50, 8:30] = 1
        masks[1, 20:60, 35:60] = 1
        boxes = torchvision.ops.masks_to_boxes(masks)
        targets.append({"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64), "masks": masks})
    expected = detector_losses(plain, images, targets)
    got = detector_losses(fast, images, targets)
    assert set(got) == set(expected) and len(expected) == 5
    for name, value in expected.items():
        assert float(value) > 0 and abs(float(got[name]) - float(value)) <= RTOL * float(value)
    fast_params = dict(fast.named_parameters())
    trained = [(n, p) for n, p in plain.named_parameters() if p.grad is not None]
    assert len(trained) > 50
    for name, param in trained:
        # a whole detector (RoI sampling, box coding) in float32: 1e-3 of each gradient's norm
        assert relative_error(fast_params[name].grad, param.grad) < 1e-3, name


def test_memory_format_auto_is_channels_last_on_cpu_only():
    assert resolve_memory_format("auto", torch.device("cpu")) is torch.channels_last
    assert resolve_memory_format("auto", torch.device("cuda")) is torch.contiguous_format
    assert resolve_memory_format("contiguous", torch.device("cpu")) is torch.contiguous_format
    assert resolve_memory_format("channels_last", torch.device("cuda")) is torch.channels_last


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_step_equals_the_per_tensor_step(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    settings = {"optimizer": optimizer, "lr": 0.01, "weight_decay": 1e-3}
    fused = build_optimizer(TrainConfig(**settings), model)
    loop = build_optimizer(TrainConfig(**settings, fused_optimizer=False), twin)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.rand(4, 3, 8, 8, generator=gen)
        for net, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    params = zip(model.named_parameters(), twin.parameters(), start.parameters(), strict=True)
    for (name, a), b, before in params:
        assert not torch.allclose(a, before, rtol=1e-3), name  # it did step
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_trainer_runs_sped_up_and_saves_the_plain_model(synthetic_root, tmp_path, mobilenet_file):
    from detfit.checkpoint import load_checkpoint
    from detfit.engine.callbacks import Callback
    from detfit.engine.trainer import Trainer

    class Losses(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_step_end(self, trainer, result) -> None:
            self.losses.append(result.loss)

    runs = {}
    for name, fast in (("fast", True), ("plain", False)):
        cfg = run_config(synthetic_root, tmp_path / name)
        cfg.weights_backbone = str(mobilenet_file[0])  # pretrained: FrozenBatchNorm
        cfg.epochs, cfg.max_iters_per_epoch = 1, 2
        if not fast:
            cfg = cfg.model_copy(update=SPEED_UPS_OFF)
        probe = Losses()
        trainer = Trainer(cfg, callbacks=[probe], progress=False, log=lambda _: None)
        trainer.fit()
        folded = sum(type(m) is FoldedConv2d for m in trainer.module.modules())
        sparse = sum(type(m) is SparseMultiScaleRoIAlign for m in trainer.module.modules())
        weight = trainer.module.backbone.body["0"][0].weight
        runs[name] = (probe.losses, folded, sparse, weight, trainer.optimizer.defaults["fused"])
    fast_losses, folded, sparse, weight, fused = runs["fast"]
    assert folded == 52 and sparse == 2 and fused is True
    assert weight.is_contiguous(memory_format=torch.channels_last)
    plain_losses, folded, sparse, weight, fused = runs["plain"]
    assert folded == 0 and sparse == 0 and not fused
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    # the first step sees the same weights on both paths
    assert abs(fast_losses[0] - plain_losses[0]) <= RTOL * plain_losses[0]

    fast_ckpt = load_checkpoint(tmp_path / "fast" / "last.pt")
    plain_ckpt = load_checkpoint(tmp_path / "plain" / "last.pt")
    assert list(fast_ckpt["model"]) == list(plain_ckpt["model"])
    assert fast_ckpt["model_info"]["structure"] == plain_ckpt["model_info"]["structure"]
    rebuilt = rebuild_model(fast_ckpt["model_info"], fast_ckpt["model"])
    assert not any(type(m) in (FoldedConv2d, SparseMultiScaleRoIAlign) for m in rebuilt.modules())
