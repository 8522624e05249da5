"""Setting ``compile``: torch.compile on the backbone and FPN keeps the state dict, the outputs
and the gradients of the eager model, and a run trains and checkpoints with it (EMA too).

The tests trace with the "aot_eager" backend: the same Dynamo graph capture and AOTAutograd
forward/backward graphs as inductor, without inductor's C++ build (minutes on a small CPU).
inductor itself was compared once on the same tiny model (boxes and scores identical,
docs/speed.md). Both tests are ``slow``: tracing MobileNetV2 with dynamic shapes takes a minute or
more on 2 cores even without inductor."""

from __future__ import annotations

import copy

import pytest
import torch

import detfit.models.speedups as speedups
from conftest import SMALL, run_config
from detfit.checkpoint import load_checkpoint, rebuild_model
from detfit.engine import fit
from detfit.models import build_model
from detfit.models.speedups import speed_up

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(speedups, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_backbone_gives_the_eager_outputs_and_gradients():
    torch.manual_seed(0)
    eager = build_model(
        "maskrcnn_mobilenet_v2_fpn", 3, weights=None, weights_backbone=None, **SMALL
    )
    speed_up(eager, CPU, fold_frozen_bn=True, memory_format="auto", sparse_roi_align=True)
    compiled = copy.deepcopy(eager)
    speedups.compile_backbone(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    gen = torch.Generator().manual_seed(0)
    for size in ((2, 3, 64, 96), (1, 3, 96, 64)):  # two shapes: dynamic, no failure on the second
        x = torch.rand(*size, generator=gen).contiguous(memory_format=torch.channels_last)
        maps = {}
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.zero_grad(set_to_none=True)
            out = model.backbone(x)
            sum((v * v).sum() for v in out.values()).backward()
            grads = {n: p.grad for n, p in model.backbone.named_parameters() if p.grad is not None}
            maps[name] = (out, grads)
        (a, ga), (b, gb) = maps["eager"], maps["compiled"]
        assert list(a) == list(b) and ga and set(ga) == set(gb)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
        for key in ga:
            torch.testing.assert_close(gb[key], ga[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_run_with_compile_trains_checkpoints_and_rebuilds(synthetic_root, tmp_path):
    cfg = run_config(synthetic_root, tmp_path / "run")
    cfg = cfg.replace(epochs=1, max_iters_per_epoch=2, compile=True, ema_decay=0.9)
    ckpt = load_checkpoint(fit(cfg, progress=False, log=lambda s: None) / "last.pt")
    assert ckpt["config"]["compile"] is True and ckpt["history"][0]["train_loss"] > 0
    plain = rebuild_model(ckpt["model_info"], ckpt["model"])  # the plain torchvision model
    assert set(plain.state_dict()) == set(ckpt["model"]) == set(ckpt["train_model"])
